"""MNIST 28x28 (TFDS `mnist`, 60k digits), unconditional: a small DDPM for one GPU.

Command:  python -m ddpm_jax.train --config=configs/mnist.py --workdir=runs/mnist
Data:     TFDS mnist, downloaded on first use (or prepared in --config.data.data_dir offline).
Hardware: one GPU or TPU chip; it also runs on a CPU, slowly.
Time:     not measured for this config (MNIST is not in the paper).
Result:   the paper has no MNIST figures; grids of EMA samples in runs/mnist/samples/ should show
          clearly recognizable digits. For an offline CPU-sized run use configs/mnist5k.py.

The paper's diffusion (T = 1000, linear β 1e-4..0.02, ε-prediction, L_simple) and optimizer (Adam
2e-4, clip 1.0, batch 128), with a 3-level ch-64 UNet (attention at 7x7), 1000 warm-up steps,
EMA 0.999 and 100-step DDIM grids.
"""

import ml_collections
from ml_collections.config_dict import placeholder


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.data = data = ml_collections.ConfigDict()
    data.dataset = "mnist"
    data.split = "train"
    data.data_dir = placeholder(str)  # --config.data.data_dir=DIR
    data.image_size = 28
    data.num_channels = 1
    data.random_flip = False  # digits are not mirror-symmetric
    data.batch_size = 128
    data.shuffle_buffer = 60_000
    data.class_conditional = False

    config.model = model = ml_collections.ConfigDict()
    model.ch = 64
    model.ch_mult = (1, 2, 2)
    model.num_res_blocks = 2
    model.attn_resolutions = (7,)
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
    optim.lr = 2e-4
    optim.warmup_steps = 1000
    optim.grad_clip = 1.0
    optim.b1 = 0.9
    optim.b2 = 0.999
    optim.eps = 1e-8

    config.train = train = ml_collections.ConfigDict()
    train.num_steps = 50_000
    train.log_every = 1000
    train.checkpoint_every = 5000
    train.keep_checkpoints = 3
    train.keep_period = 0
    train.sample_every = 10_000
    train.ema_decay = 0.999
    train.steps_per_dispatch = 1

    config.sample = sample = ml_collections.ConfigDict()
    sample.sampler = "ddim"
    sample.num_steps = 100
    sample.eta = 0.0
    sample.clip_denoised = True
    sample.num_images = 64
    # Evaluation during training: off; "digits" is the offline digits metric.
    config.eval = ev = ml_collections.ConfigDict()
    ev.every_steps = 0
    ev.metrics = "digits"  # fid, is, kid or digits; the first one picks the best checkpoint
    ev.num_samples = 1000
    ev.batch_size = 100
    ev.sampler = placeholder(str)
    ev.num_steps = placeholder(int)
    ev.eta = placeholder(float)  # None: the sample section's
    ev.convention = "tf"
    ev.reference = placeholder(str)  # None: <dataset>:<split>, the training data
    ev.inception_weights = placeholder(str)  # None: $DDPM_JAX_INCEPTION_WEIGHTS
    ev.keep_best = True  # EMA params of the best evaluation in <workdir>/best
    return config
