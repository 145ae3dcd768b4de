"""Every field of a training config, with the paper's CIFAR-10 values (Ho et al. 2020, Sec. 4 and
Appendix B), which cifar10.py runs as they are.

Each config imports this one and overrides what differs. A field that may be None is a typed
placeholder, so that ``--config.field=value`` can still set it.
"""

import ml_collections
from ml_collections.config_dict import placeholder

from ddpm_jax import sampler_spec


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.data = data = ml_collections.ConfigDict()
    data.dataset = "cifar10"
    data.split = "train"
    data.data_dir = placeholder(str)  # --config.data.data_dir=DIR
    data.image_size = 32
    data.num_channels = 3
    data.random_flip = True
    data.batch_size = 128
    data.shuffle_buffer = 50_000
    data.class_conditional = False

    config.model = model = ml_collections.ConfigDict()
    model.ch = 128
    model.ch_mult = (1, 2, 2, 2)
    model.num_res_blocks = 2
    model.attn_resolutions = (16,)
    model.dropout = 0.1
    model.resamp_with_conv = True
    model.num_classes = placeholder(int)  # set for class-conditional runs
    # Classifier-free guidance (Ho & Salimans 2022): the probability that training replaces a
    # label by "no class" (an extra class-embedding row, hence a model field). 0: no such row.
    model.p_uncond = 0.0
    model.dtype = "float32"
    # Rematerialise each ResnetBlock / AttnBlock in the backward pass to save memory: "none",
    # "blocks" (keep only each block's inputs) or "blocks_dots" (also conv/matmul outputs).
    model.remat = "none"

    config.diffusion = diff = ml_collections.ConfigDict()
    diff.schedule = "linear"
    diff.num_timesteps = 1000
    diff.beta_start = 1e-4
    diff.beta_end = 0.02
    diff.mean_type = "eps"
    diff.var_type = "fixedlarge"

    config.optim = optim = ml_collections.ConfigDict()
    optim.lr = 2e-4
    optim.warmup_steps = 5000
    optim.grad_clip = 1.0
    # The original clips each TPU v3-8 replica's gradient (16 of the 128 examples) at grad_clip,
    # then averages: 8 groups, whatever the device count. 1 clips the whole batch's gradient.
    # Each device clips its own groups (no extra FLOPs or collectives): clip_groups must be 1, a
    # multiple of the device count (groups run one after another on each device) or a divisor
    # of it (a group spans several devices: one more all-reduce of the gradient per step).
    # Free with one group per device (8 accelerators). With several per device each group's
    # backward pass runs on a smaller batch: on a 2-core CPU (2 devices, 4 groups each) the
    # CIFAR-10 step at batch 16 ran at 0.74x the rate of clip_groups=1 (benchmarks/RESULTS.md).
    optim.clip_groups = 8
    optim.b1 = 0.9
    optim.b2 = 0.999
    optim.eps = 1e-8

    config.train = train = ml_collections.ConfigDict()
    train.num_steps = 800_000
    train.log_every = 1000
    train.checkpoint_every = 10_000
    train.keep_checkpoints = 3
    train.keep_period = 100_000
    train.sample_every = 50_000
    train.ema_decay = 0.9999
    train.steps_per_dispatch = 1
    # The PRNG implementation of the run's key (jax.random.key_impl names). "threefry2x32" (runs
    # from before this field used it): the same bits on every backend and device count, each
    # device drawing only its own shard's. "rbg" / "unsafe_rbg" (XLA's RngBitGenerator): cheaper
    # per bit (a CIFAR-10 step's 140M words of t, ε and dropout: 10.0 s against threefry's 13.6 s
    # on a loaded 2-core CPU, benchmarks/prng_draws.py), but not split over a sharded batch: each
    # device draws the whole global batch's bits (8x the work on 8 devices, on XLA:CPU and in a
    # TPU v5e compile alike), and the bits depend on the backend and XLA version. Recorded in the
    # workdir: a run cannot resume with another.
    train.prng_impl = "threefry2x32"

    config.sample = sample = ml_collections.ConfigDict()
    sample.sampler = "ddpm"
    sample.num_steps = placeholder(int)  # None: all 1000 steps, as in the paper
    sampler_spec.add_option_fields(sample, inherit=False)  # eta (DDIM's), ...: their defaults
    sample.clip_denoised = True
    sample.num_images = 64
    sample.guidance = 0.0  # w of ε̂ = (1+w) ε(x_t, y) - w ε(x_t, ∅); needs model.p_uncond > 0
    # Guide only the timesteps t_min..t_max (Kynkäänniemi et al. 2024), e.g. (400, 999); None: all.
    sample.guidance_interval = placeholder(tuple)
    # Evaluation during training: off (every_steps=0). With every_steps=50_000 each evaluation
    # draws 10k DDIM-100 samples: 1M UNet forward passes, about the compute of 2,600 training
    # steps of batch 128 (forward + backward ~ 3 forward passes per image), i.e. +5% at 50k.
    # FID@10k is not the paper's FID@50k: use `python -m ddpm_jax.evaluate` for that.
    config.eval = ev = ml_collections.ConfigDict()
    ev.every_steps = 0
    ev.metrics = "fid"  # fid, is, kid or digits; the first one picks the best checkpoint
    ev.num_samples = 10_000
    ev.batch_size = 400  # divides 8 and 16 devices and num_samples (25 full chunks)
    ev.sampler = "ddim"
    ev.num_steps = 100
    sampler_spec.add_option_fields(ev, inherit=True)  # eta, ...: None, the sample section's
    ev.convention = "tf"
    ev.reference = placeholder(str)  # None: <dataset>:<split>, the training data
    ev.inception_weights = placeholder(str)  # None: $DDPM_JAX_INCEPTION_WEIGHTS
    ev.keep_best = True  # EMA params of the best evaluation in <workdir>/best
    return config
