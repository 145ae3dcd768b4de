"""LSUN Church 256x256, unconditional: the paper's 256x256 settings (Ho et al. 2020, Appendix B).

Command:  python -m ddpm_jax.train --config=configs/lsun_church256.py --workdir=runs/lsun_church256
Data:     TFDS lsun/church_outdoor (center-cropped and area-resized to 256x256 by the pipeline).
Hardware: the paper used a TPU v3-8 (8 accelerators with >= 16 GB each).
Time:     the paper reports 2.2 steps/s at batch 64 on a TPU v3-8 for its 256x256 models; its
          1.2M LSUN Church steps are then about 150 hours.
Result:   the paper reports FID 7.89 (Table 3, EMA params, 1000-step ancestral sampling).

Model: ch 128, ch_mult (1, 1, 2, 2, 4, 4), 2 res blocks per level, self-attention at 16x16, no
dropout (114M parameters). L_simple, T = 1000, linear β 1e-4..0.02, Adam 2e-5 (2e-4 was unstable
at this size, Appendix B) with 5000 warm-up steps, grad-norm clip 1.0, batch 64, EMA 0.9999.
Samples use σ_t² = β̃_t ("fixedsmall"), as the original 256x256 code (diffusion_utils.py) does.
Random horizontal flips.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.data = data = ml_collections.ConfigDict()
    data.dataset = "lsun/church_outdoor"
    data.split = "train"
    data.data_dir = None
    data.image_size = 256
    data.num_channels = 3
    data.random_flip = True
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
    model.num_classes = None
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
    train.num_steps = 1_200_000
    train.log_every = 1000
    train.checkpoint_every = 10_000
    train.keep_checkpoints = 3
    train.keep_period = 100_000
    train.sample_every = 50_000
    train.ema_decay = 0.9999
    train.steps_per_dispatch = 1

    config.sample = sample = ml_collections.ConfigDict()
    sample.sampler = "ddpm"
    sample.num_steps = None  # all 1000 steps, as in the paper
    sample.eta = 0.0
    sample.clip_denoised = True
    sample.num_images = 16
    return config
