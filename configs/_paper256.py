"""The paper's 256x256 settings (Ho et al. 2020, Appendix B), shared by celebahq256.py,
lsun_church256.py and lsun_bedroom256.py, which differ only in dataset, length and flips.

Model: ch 128, ch_mult (1, 1, 2, 2, 4, 4), 2 res blocks per level, self-attention at 16x16, no
dropout (114M parameters). L_simple, T = 1000, linear β 1e-4..0.02, Adam 2e-5 (2e-4 was unstable
at this size, Appendix B) with 5000 warm-up steps, grad-norm clip 1.0, batch 64, EMA 0.9999.
Samples use σ_t² = β̃_t ("fixedsmall"), as the original 256x256 code (diffusion_utils.py) does.
Not a runnable config itself.
"""

import ml_collections
from ml_collections.config_dict import placeholder


def get_config(dataset: str, num_steps: int, random_flip: bool) -> ml_collections.ConfigDict:
    """The paper's 256x256 config for one TFDS ``dataset``."""
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.data = data = ml_collections.ConfigDict()
    data.dataset = dataset
    data.split = "train"
    data.data_dir = placeholder(str)  # --config.data.data_dir=DIR
    data.image_size = 256
    data.num_channels = 3
    data.random_flip = random_flip
    data.batch_size = 64
    data.shuffle_buffer = 10_000
    data.class_conditional = False

    config.model = model = ml_collections.ConfigDict()
    model.ch = 128
    model.ch_mult = (1, 1, 2, 2, 4, 4)
    model.num_res_blocks = 2
    model.attn_resolutions = (16,)
    model.dropout = 0.0
    model.resamp_with_conv = True
    model.num_classes = placeholder(int)  # set for class-conditional runs
    model.dtype = "float32"

    config.diffusion = diff = ml_collections.ConfigDict()
    diff.schedule = "linear"
    diff.num_timesteps = 1000
    diff.beta_start = 1e-4
    diff.beta_end = 0.02
    diff.mean_type = "eps"
    diff.var_type = "fixedsmall"  # the original 256x256 code samples with β̃_t

    config.optim = optim = ml_collections.ConfigDict()
    optim.lr = 2e-5
    optim.warmup_steps = 5000
    optim.grad_clip = 1.0
    optim.b1 = 0.9
    optim.b2 = 0.999
    optim.eps = 1e-8

    config.train = train = ml_collections.ConfigDict()
    train.num_steps = num_steps
    train.log_every = 1000
    train.checkpoint_every = 10_000
    train.keep_checkpoints = 3
    train.keep_period = 100_000
    train.sample_every = 50_000
    train.ema_decay = 0.9999
    train.steps_per_dispatch = 1

    config.sample = sample = ml_collections.ConfigDict()
    sample.sampler = "ddpm"
    sample.num_steps = placeholder(int)  # None: all 1000 steps, as in the paper
    sample.eta = 0.0
    sample.clip_denoised = True
    sample.num_images = 16
    # Evaluation during training: off (every_steps=0); see cifar10.py for the cost.
    config.eval = ev = ml_collections.ConfigDict()
    ev.every_steps = 0
    ev.metrics = "fid"  # fid, is, kid or digits; the first one picks the best checkpoint
    ev.num_samples = 10_000
    ev.batch_size = 64
    ev.sampler = "ddim"
    ev.num_steps = 100
    ev.eta = placeholder(float)  # None: the sample section's
    ev.convention = "tf"
    ev.reference = placeholder(str)  # None: <dataset>:<split>, the training data
    ev.inception_weights = placeholder(str)  # None: $DDPM_JAX_INCEPTION_WEIGHTS
    ev.keep_best = True  # EMA params of the best evaluation in <workdir>/best
    return config
