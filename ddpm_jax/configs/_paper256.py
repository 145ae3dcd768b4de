"""The paper's 256x256 settings (Ho et al. 2020, Appendix B), shared by celebahq256.py,
lsun_church256.py and lsun_bedroom256.py, which differ only in dataset, length and flips.

Model: ch 128, ch_mult (1, 1, 2, 2, 4, 4), 2 res blocks per level, self-attention at 16x16, no
dropout (114M parameters). L_simple, T = 1000, linear β 1e-4..0.02, Adam 2e-5 (2e-4 was unstable
at this size, Appendix B) with 5000 warm-up steps, grad-norm clip 1.0, batch 64, EMA 0.9999.
Samples use σ_t² = β̃_t ("fixedsmall"), as the original 256x256 code (diffusion_utils.py) does.
The rest is _default.py's (the CIFAR-10 setting). Not a runnable config itself.

Memory: compiled for 8 TPU v5e chips at batch 64 (float32, clip_groups 8, before the per-device
clipping and GroupNorm changes; measured for issue 21): 1.70 GiB of arguments and 7.95 GiB of
temporaries per 16 GiB chip, 1,484 GFLOP and 15 GB per image of XLA's "bytes accessed" (on a
TPU that also counts on-chip memory traffic: the HBM share, which the compile report now prints,
was 20-25% of it for the CIFAR-10 step; see cifar10.py). Not yet compiled with today's code:
`benchmarks/compile_matrix.sh blocks` does it.

Steps per dispatch: 25. The 114M-parameter state has 1,804 leaves; a dispatch of CIFAR-10's
1,316 cost the host at most 12.3 ms (best of 30 on a loaded 2-core VM split into 8 devices,
benchmarks/dispatch_time.py; this state's replicas do not fit that VM's memory 8 times), so
about 17 ms here, scaled by leaves (on 2 devices: 16.9 ms median, 12.2 best). A device step at
8 images per device: ~42 ms on 8 H100s if they reach the CIFAR-10 goal's FLOP rate (8,000
images/s of 35.4 GFLOP; 1,484 GFLOP per image here, from the v5e compile), at least 60 ms on a
v5e (8 images of 1,484 GFLOP at peak bf16; the 146 ms given before came from all-memory-space
traffic). 25 steps keep the host under 2% of either (1.6%, 1.1%) and divide every boundary; a
dispatch's batches take 1.3 GB of host memory (157 MB per device), and a SIGTERM is answered after at most 25 steps (1-4 s). On a CPU use
--config.train.steps_per_dispatch=1.
"""

import ml_collections

from ddpm_jax.configs import _default


def get_config(dataset: str, num_steps: int, random_flip: bool) -> ml_collections.ConfigDict:
    """The paper's 256x256 config for one TFDS ``dataset``."""
    config = _default.get_config()
    config.data.dataset = dataset
    config.data.image_size = 256
    config.data.random_flip = random_flip
    config.data.batch_size = 64
    config.data.shuffle_buffer = 10_000
    config.model.ch_mult = (1, 1, 2, 2, 4, 4)
    config.model.dropout = 0.0
    config.diffusion.var_type = "fixedsmall"  # the original 256x256 code samples with β̃_t
    config.optim.lr = 2e-5
    config.train.num_steps = num_steps
    config.train.steps_per_dispatch = 25  # see the docstring
    config.sample.num_images = 16
    config.eval.batch_size = 64
    return config
