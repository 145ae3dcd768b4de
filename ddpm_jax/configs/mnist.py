"""MNIST 28x28 (TFDS `mnist`, 60k digits), unconditional: a small DDPM for one GPU.

Command:  python -m ddpm_jax.train --config=mnist --workdir=runs/mnist
Data:     TFDS mnist, downloaded on first use (or prepared in --config.data.data_dir offline).
Hardware: one GPU or TPU chip; it also runs on a CPU, slowly.
Time:     not measured for this config (MNIST is not in the paper).
Result:   the paper has no MNIST figures; grids of EMA samples in runs/mnist/samples/ should show
          clearly recognizable digits. For an offline CPU-sized run use mnist5k.py.

The paper's diffusion (T = 1000, linear β 1e-4..0.02, ε-prediction, L_simple) and optimizer (Adam
2e-4, clip 1.0, batch 128), with a 3-level ch-64 UNet (attention at 7x7), 1000 warm-up steps,
EMA 0.999 and 100-step DDIM grids.
"""

import ml_collections
from ml_collections.config_dict import placeholder

from ddpm_jax.configs import _default


def get_config() -> ml_collections.ConfigDict:
    config = _default.get_config()
    config.data.dataset = "mnist"
    config.data.image_size = 28
    config.data.num_channels = 1
    config.data.random_flip = False  # digits are not mirror-symmetric
    config.data.shuffle_buffer = 60_000

    config.model.ch = 64
    config.model.ch_mult = (1, 2, 2)
    config.model.attn_resolutions = (7,)

    config.optim.warmup_steps = 1000
    config.optim.clip_groups = 1

    config.train.num_steps = 50_000
    config.train.checkpoint_every = 5000
    config.train.keep_period = 0
    config.train.sample_every = 10_000
    config.train.ema_decay = 0.999

    config.sample.sampler = "ddim"
    config.sample.num_steps = 100
    # Evaluation during training: off; "digits" is the offline digits metric.
    config.eval.metrics = "digits"
    config.eval.num_samples = 1000
    config.eval.batch_size = 200  # divides 8 devices and num_samples
    config.eval.sampler = placeholder(str)  # None: the sample section's
    config.eval.num_steps = placeholder(int)
    return config
