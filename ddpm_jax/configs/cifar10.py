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
--topology=v5e:2x4`; benchmarks/RESULTS.md), batch 128 (16 images per chip), two all-reduces and
no all-gather per step, 35.4-35.7 GFLOP per training image:
  float32 (2 steps per dispatch): 1.37 GiB per chip (91% of its 16 GiB free), 196 MB of HBM
    traffic per image (3.13 GB per step; XLA's "bytes accessed", which also counts on-chip
    memory, 15.6 GB); roofline bound (not a measurement) 33,400 images/s, memory-bound.
  bfloat16 (1 step per dispatch, before the GroupNorm barrier): 1.11 GiB per chip (93% free),
    164 MB of HBM per image (2.63 GB per step), of which the float32 state's update (params,
    Adam, EMA) and weights are ~66%; bound 39,900 images/s (memory 3.2 ms vs compute 2.9 ms).
  bfloat16 does not halve the float32 step's HBM traffic at 16 images per chip: the float32
  state's traffic per step (~1.7 GB) does not shrink with the compute dtype.

Steps per dispatch: 500 (the paper's settings are _default.py's; this one is not a training
setting). One dispatch of the train step (its 1,316-leaf state on 8 devices) cost the host 12.1
to 12.3 ms at best, 14-50 ms median, on a loaded 2-core VM (benchmarks/dispatch_time.py, load
11-25; an upper bound for a dedicated host core), against a device step of ~2 ms on 8 GPUs at
16 images each (an H100 at the 8,000 images/s goal) or at least 3.8 ms on a TPU v5e at 16
images per chip (float32, the compiled step's HBM bound above): 500 steps put that best figure
at 1.2% of the GPU steps' time (under the 2% goal) and at 0.6% of the v5e's. 500 divides every
boundary (log_every 1000); the batches of a dispatch take 98 MB per device, and a SIGTERM is
answered after at most 500 steps (1 s on such GPUs, ~2 s on a v5e). On a CPU use
--config.train.steps_per_dispatch=1 (XLA:CPU runs the K-step loop slowly; a CPU step takes
seconds).
The K-step scan: XLA's cost analysis counts a loop body once (checked on XLA:CPU and XLA:TPU),
so the report's per-step figures are right; the scan raises XLA's "bytes accessed" per step
(float32: 10.8 GB at K=1, 15.6 GB at K=2; bfloat16: 10.8 at K=1, 15.2 at K=500), which is
on-chip memory traffic as far as measured (the tiny config's HBM per step is the same at K=1
and K=2; the like-for-like HBM comparison on this model is still to be compiled;
benchmarks/RESULTS.md).
"""

import ml_collections

from ddpm_jax.configs import _default


def get_config() -> ml_collections.ConfigDict:
    config = _default.get_config()  # the defaults are the paper's setting
    config.train.steps_per_dispatch = 500  # see the docstring
    return config
