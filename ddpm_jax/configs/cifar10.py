"""CIFAR-10 32x32, unconditional: Ho et al. 2020 exactly (Sec. 4, Appendix B).

Command:  python -m ddpm_jax.train --config=cifar10 --workdir=runs/cifar10
Hardware: the paper used a TPU v3-8; any 8-accelerator host (TPU v3-8/v4-8, 8 GPUs) fits.
Time:     the paper reports 21 steps/s at batch 128 on a TPU v3-8, i.e. 10.6 hours for 800k steps.
Result:   the paper reports FID 3.17, Inception Score 9.46 and NLL <= 3.75 bits/dim (test) with
          the EMA params and 1000-step ancestral sampling (fixedlarge σ_t² = β_t).

Model: ch 128, ch_mult (1, 2, 2, 2), 2 res blocks per level, self-attention at 16x16, dropout 0.1
(35.7M parameters). L_simple, T = 1000, linear β 1e-4..0.02, Adam 2e-4 with 5000 warm-up steps,
grad-norm clip 1.0, batch 128, EMA 0.9999, random horizontal flips.
"""

import ml_collections

from ddpm_jax.configs import _default


def get_config() -> ml_collections.ConfigDict:
    return _default.get_config()  # the defaults are this setting
