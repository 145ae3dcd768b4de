"""LSUN Church 256x256, unconditional: the paper's 256x256 settings (Ho et al. 2020, Appendix B).

Command:  python -m ddpm_jax.train --config=lsun_church256 --workdir=runs/lsun_church256
Data:     TFDS lsun/church_outdoor (center-cropped and area-resized to 256x256 by the pipeline).
Hardware: the paper used a TPU v3-8 (8 accelerators with >= 16 GB each).
Time:     the paper reports 2.2 steps/s at batch 64 on a TPU v3-8 for its 256x256 models; its
          1.2M LSUN Church steps are then about 150 hours.
Result:   the paper reports FID 7.89 (Table 3, EMA params, 1000-step ancestral sampling).

The shared settings (model, diffusion, optimizer) are in _paper256.py.
Random horizontal flips.
"""

import ml_collections

from ddpm_jax.configs import _paper256


def get_config() -> ml_collections.ConfigDict:
    return _paper256.get_config(
        dataset="lsun/church_outdoor", num_steps=1_200_000, random_flip=True
    )
