"""CelebA-HQ 256x256, unconditional: the paper's 256x256 settings (Ho et al. 2020, Appendix B).

Command:  python -m ddpm_jax.train --config=celebahq256 --workdir=runs/celebahq256
Data:     TFDS celeb_a_hq/256 needs a manual download (see its TFDS page); prepare it once and set
          --config.data.data_dir to the TFDS directory holding it.
Hardware: the paper used a TPU v3-8 (8 accelerators with >= 16 GB each).
Time:     the paper reports 2.2 steps/s at batch 64 on a TPU v3-8 for its 256x256 models; its
          0.5M CelebA-HQ steps are then about 63 hours.
Result:   the paper shows CelebA-HQ samples (Fig. 1, Appendix) but reports no FID for them.

The shared settings (model, diffusion, optimizer) are in _paper256.py.
Random horizontal flips.
"""

import ml_collections

from ddpm_jax.configs import _paper256


def get_config() -> ml_collections.ConfigDict:
    return _paper256.get_config(dataset="celeb_a_hq/256", num_steps=500_000, random_flip=True)
