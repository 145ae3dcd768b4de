"""CIFAR-10 32x32, unconditional: Ho et al. 2020 exactly (Sec. 4, Appendix B).

Command:  python -m ddpm_jax.train --config=cifar10 --workdir=runs/cifar10
Hardware: the paper used a TPU v3-8; any 8-accelerator host (TPU v3-8/v4-8, 8 GPUs) fits.
Time:     the paper reports 21 steps/s at batch 128 on a TPU v3-8, i.e. 10.6 hours for 800k steps.
Result:   the paper reports FID 3.17, Inception Score 9.46 and NLL <= 3.75 bits/dim (test) with
          the EMA params and 1000-step ancestral sampling (fixedlarge σ_t² = β_t).

Model: ch 128, ch_mult (1, 2, 2, 2), 2 res blocks per level, self-attention at 16x16, dropout 0.1
(35.7M parameters). L_simple, T = 1000, linear β 1e-4..0.02, Adam 2e-4 with 5000 warm-up steps,
grad-norm clip 1.0, batch 128, EMA 0.9999, random horizontal flips.

Compiled for 8 TPU v5e chips (compile-only, `benchmarks/compile_report.py --config=cifar10
--topology=v5e:2x4`; benchmarks/RESULTS.md): float32, batch 128: 1.17 GiB per chip (93% of its
16 GiB free), 35.4 GFLOP and 675 MB of HBM traffic per training image, two all-reduces and no
all-gather per step; a roofline bound (not a measurement) of 9,709 images/s, memory-bound.

Steps per dispatch: 500 (the paper's settings are _default.py's; this one is not a training
setting). One dispatch of the train step (its 1,316-leaf state on 8 devices) cost the host 12.1
to 12.3 ms at best, 14-50 ms median, on a loaded 2-core VM (benchmarks/dispatch_time.py, load
11-25; an upper bound for a dedicated host core), against a device step of ~2 ms on 8 GPUs at
16 images each (an H100 at the 8,000 images/s goal) or ~21 ms on a TPU v5e at 32 images per chip
(float32, the compiled step's HBM-traffic bound): 500 steps put that best figure at 1.2% of the
GPU steps' time (under the 2% goal) and at 0.1% of the v5e's. 500 divides every boundary
(log_every 1000); the batches of a dispatch take 98 MB per device, and a SIGTERM is answered
after at most 500 steps (1 s on such GPUs, 11 s on a v5e). On a CPU use
--config.train.steps_per_dispatch=1 (XLA:CPU runs the K-step loop slowly; a CPU step takes
seconds).
Open: compiled for 8 TPU v5e chips, the bf16 step at K=500 moves 15.2 GB of HBM per step
against 10.8 GB for float32 at K=1; whether the scan or bf16 adds it is not yet separated
(benchmarks/RESULTS.md).
"""

import ml_collections

from ddpm_jax.configs import _default


def get_config() -> ml_collections.ConfigDict:
    config = _default.get_config()  # the defaults are the paper's setting
    config.train.steps_per_dispatch = 500  # see the docstring
    return config
