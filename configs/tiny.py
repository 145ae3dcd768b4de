"""Seconds-scale config for tests: a 1-level ch-32 UNet on 8 real MNIST digits (16x16) a step.

Command: python -m ddpm_jax.train --config=configs/tiny.py --workdir=/tmp/tiny
Hardware: any CPU. Time: well under a minute (mostly compilation).
Result: none worth looking at; it exercises every part of the training program.
"""

import ml_collections
from ml_collections.config_dict import placeholder


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.data = data = ml_collections.ConfigDict()
    data.dataset = "mnist5k"
    data.split = "train"
    data.data_dir = placeholder(str)  # --config.data.data_dir=DIR
    data.image_size = 16
    data.num_channels = 1
    data.random_flip = False
    data.batch_size = 8
    data.shuffle_buffer = 1000
    data.class_conditional = False

    config.model = model = ml_collections.ConfigDict()
    model.ch = 32
    model.ch_mult = (1,)
    model.num_res_blocks = 1
    model.attn_resolutions = ()
    model.dropout = 0.1
    model.resamp_with_conv = True
    model.num_classes = placeholder(int)  # set for class-conditional runs
    model.dtype = "float32"

    config.diffusion = diff = ml_collections.ConfigDict()
    diff.schedule = "linear"
    diff.num_timesteps = 1000
    diff.beta_start = 1e-4
    diff.beta_end = 0.02
    diff.mean_type = "eps"
    diff.var_type = "fixedlarge"

    config.optim = optim = ml_collections.ConfigDict()
    optim.lr = 1e-3
    optim.warmup_steps = 2
    optim.grad_clip = 1.0
    optim.b1 = 0.9
    optim.b2 = 0.999
    optim.eps = 1e-8

    config.train = train = ml_collections.ConfigDict()
    train.num_steps = 4
    train.log_every = 2
    train.checkpoint_every = 2
    train.keep_checkpoints = 3
    train.keep_period = 0
    train.sample_every = 4
    train.ema_decay = 0.9
    train.steps_per_dispatch = 1

    config.sample = sample = ml_collections.ConfigDict()
    sample.sampler = "ddim"
    sample.num_steps = 2
    sample.eta = 0.0
    sample.clip_denoised = True
    sample.num_images = 8
    # Evaluation during training: off (tests turn it on).
    config.eval = ev = ml_collections.ConfigDict()
    ev.every_steps = 0
    ev.metrics = "digits"  # fid, is, kid or digits; the first one picks the best checkpoint
    ev.num_samples = 16
    ev.batch_size = 8
    ev.sampler = placeholder(str)
    ev.num_steps = placeholder(int)
    ev.eta = placeholder(float)  # None: the sample section's
    ev.convention = "tf"
    ev.reference = placeholder(str)  # None: <dataset>:<split>, the training data
    ev.inception_weights = placeholder(str)  # None: $DDPM_JAX_INCEPTION_WEIGHTS
    ev.keep_best = True  # EMA params of the best evaluation in <workdir>/best
    return config
