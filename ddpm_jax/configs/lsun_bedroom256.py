"""LSUN Bedroom 256x256, unconditional: the paper's 256x256 settings (Ho et al. 2020, Appendix B).

Command:  python -m ddpm_jax.train --config=lsun_bedroom256 --workdir=runs/lsun_bedroom256
Data:     TFDS lsun/bedroom (center-cropped and area-resized to 256x256 by the pipeline).
Hardware: the paper used a TPU v3-8 (8 accelerators with >= 16 GB each).
Time:     the paper reports 2.2 steps/s at batch 64 on a TPU v3-8 for its 256x256 models; its
          2.4M LSUN Bedroom steps are then about 300 hours.
Result:   the paper reports FID 6.36 for this 114M model (Table 3; 4.90 for a larger model
          trained 1.15M steps, not configured here).

The shared settings (model, diffusion, optimizer) are in _paper256.py.
No flips: Appendix B uses random flips for every dataset except LSUN Bedroom.
"""

import ml_collections

from ddpm_jax.configs import _paper256


def get_config() -> ml_collections.ConfigDict:
    return _paper256.get_config(dataset="lsun/bedroom", num_steps=2_400_000, random_flip=False)
