"""Seconds-scale config for tests: a 1-level ch-32 UNet on 8 real MNIST digits (16x16) a step.

Command: python -m ddpm_jax.train --config=tiny --workdir=/tmp/tiny
Hardware: any CPU. Time: well under a minute (mostly compilation).
Result: none worth looking at; it exercises every part of the training program.
"""

import ml_collections
from ml_collections.config_dict import placeholder

from ddpm_jax.configs import _default


def get_config() -> ml_collections.ConfigDict:
    config = _default.get_config()
    config.data.dataset = "mnist5k"
    config.data.image_size = 16
    config.data.num_channels = 1
    config.data.random_flip = False
    config.data.batch_size = 8
    config.data.shuffle_buffer = 1000

    config.model.ch = 32
    config.model.ch_mult = (1,)
    config.model.num_res_blocks = 1
    config.model.attn_resolutions = ()

    config.optim.lr = 1e-3
    config.optim.warmup_steps = 2
    config.optim.clip_groups = 1

    config.train.num_steps = 4
    config.train.log_every = 2
    config.train.checkpoint_every = 2
    config.train.keep_period = 0
    config.train.sample_every = 4
    config.train.ema_decay = 0.9

    config.sample.sampler = "ddim"
    config.sample.num_steps = 2
    config.sample.num_images = 8
    # Evaluation during training: off (tests turn it on).
    config.eval.metrics = "digits"
    config.eval.num_samples = 16
    config.eval.batch_size = 8
    config.eval.sampler = placeholder(str)  # None: the sample section's
    config.eval.num_steps = placeholder(int)
    return config
