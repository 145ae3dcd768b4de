"""Configs: the shared schema, the paper's settings, model sizes, and self-describing docstrings."""

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from ddpm_jax import diffusion, sampling, train
from ddpm_jax.models import unet_from_config

ROOT = Path(__file__).resolve().parents[1]
NAMES = ("cifar10", "celebahq256", "lsun_church256", "lsun_bedroom256", "mnist", "mnist5k", "tiny")
PAPER_256 = ("celebahq256", "lsun_church256", "lsun_bedroom256")
SCHEMA = {
    "seed": None,
    "data": {"dataset", "split", "data_dir", "image_size", "num_channels", "random_flip",
             "batch_size", "shuffle_buffer", "class_conditional"},
    "model": {"ch", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout",
              "resamp_with_conv", "num_classes", "dtype"},
    "diffusion": {"schedule", "num_timesteps", "beta_start", "beta_end", "mean_type", "var_type"},
    "optim": {"lr", "warmup_steps", "grad_clip", "b1", "b2", "eps"},
    "train": {"num_steps", "log_every", "checkpoint_every", "keep_checkpoints", "keep_period",
              "sample_every", "ema_decay", "steps_per_dispatch"},
    "sample": {"sampler", "num_steps", "eta", "clip_denoised", "num_images"},
    "eval": {"every_steps", "metrics", "num_samples", "batch_size", "sampler", "num_steps", "eta",
             "convention", "reference", "inception_weights", "keep_best"},
}


def _module(name: str):
    path = ROOT / "configs" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"configs.{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _num_params(config) -> int:
    model = unet_from_config(config.model, config.data.num_channels)
    size = config.data.image_size
    t = jnp.zeros((1,), jnp.int32)
    shapes = jax.eval_shape(
        model.init,
        jax.random.PRNGKey(0),
        jnp.zeros((1, size, size, config.data.num_channels)),
        t,
        t if config.model.num_classes is not None else None,  # class labels
    )
    return sum(x.size for x in jax.tree.leaves(shapes))


@pytest.mark.parametrize("name", NAMES)
def test_config_follows_the_schema_and_is_consistent(name):
    config = _module(name).get_config()
    assert set(config.keys()) == set(SCHEMA)
    for section, fields in SCHEMA.items():
        if fields is not None:
            assert set(config[section].keys()) == fields, section
    diffusion.make_schedule(
        config.diffusion.schedule, config.diffusion.num_timesteps,
        beta_start=config.diffusion.beta_start, beta_end=config.diffusion.beta_end,
    )
    assert config.diffusion.mean_type in diffusion.MEAN_TYPES
    assert config.diffusion.var_type in diffusion.VAR_TYPES
    assert config.sample.sampler in sampling.SAMPLERS
    assert config.data.batch_size % 8 == 0  # splits over 8 accelerators (or fake devices)
    train_config = config.train
    assert 0 < train_config.log_every <= train_config.num_steps
    assert 0 < train_config.checkpoint_every <= train_config.num_steps
    assert 0.0 <= train_config.ema_decay < 1.0
    assert _num_params(config) > 0  # the UNet is valid at this image size


@pytest.mark.parametrize("name", NAMES)
def test_docstring_gives_command_hardware_time_and_result(name):
    doc = _module(name).__doc__
    for heading in ("Command:", "Hardware:", "Time:", "Result:"):
        assert heading in doc, heading
    if name == "mnist5k":
        assert "python -m ddpm_jax.train " in doc  # the no-argument default
    else:
        assert f"python -m ddpm_jax.train --config=configs/{name}.py" in doc


def test_the_default_config_is_mnist5k():
    assert train.DEFAULT_CONFIG == ROOT / "configs" / "mnist5k.py"
    config = _module("mnist5k").get_config()
    assert config.data.dataset == "mnist5k"
    assert (config.data.image_size, config.data.num_channels) == (28, 1)
    assert config.diffusion.num_timesteps == 1000 and config.diffusion.schedule == "linear"
    assert (config.model.num_classes, config.data.class_conditional) == (10, True)
    assert config.sample.num_images == 100  # a 10x10 grid: column k shows digit k


def test_mnist5k_unconditional_variant():
    module = _module("mnist5k")
    config = module.get_config("unconditional")
    assert (config.model.num_classes, config.data.class_conditional) == (None, False)
    config.model.num_classes = 3  # still an int field a flag can set
    with pytest.raises(TypeError):
        config.model.num_classes = "ten"
    with pytest.raises(ValueError, match="variants 'conditional'.*'unconditional'"):
        module.get_config("uncond")


@pytest.mark.parametrize("argument, name", [
    ("configs/cifar10.py", "cifar10"),
    ("configs/mnist5k.py:unconditional", "mnist5k_unconditional"),
])
def test_default_workdir_names_the_config_and_its_variant(argument, name):
    from absl import flags
    from ml_collections import config_flags

    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, flag_values=values)
    values(["ddpm_jax.train", f"--config={ROOT / argument}"])
    assert train.default_run_name(values["config"]) == name


def test_cifar10_is_the_paper_setting():
    """Ho et al. 2020, Sec. 4 and Appendix B."""
    c = _module("cifar10").get_config()
    assert (c.data.dataset, c.data.image_size, c.data.num_channels) == ("cifar10", 32, 3)
    assert c.data.random_flip and c.data.batch_size == 128
    assert (c.model.ch, tuple(c.model.ch_mult), c.model.num_res_blocks) == (128, (1, 2, 2, 2), 2)
    assert tuple(c.model.attn_resolutions) == (16,) and c.model.dropout == 0.1
    assert c.model.resamp_with_conv
    assert (c.diffusion.schedule, c.diffusion.num_timesteps) == ("linear", 1000)
    assert (c.diffusion.beta_start, c.diffusion.beta_end) == (1e-4, 0.02)
    assert (c.diffusion.mean_type, c.diffusion.var_type) == ("eps", "fixedlarge")
    assert (c.optim.lr, c.optim.warmup_steps, c.optim.grad_clip) == (2e-4, 5000, 1.0)
    assert (c.optim.b1, c.optim.b2, c.optim.eps) == (0.9, 0.999, 1e-8)
    assert c.train.ema_decay == 0.9999 and c.train.num_steps == 800_000
    assert c.sample.sampler == "ddpm" and c.sample.num_steps is None
    assert round(_num_params(c) / 1e6, 1) == 35.7  # "35.7 million parameters"


@pytest.mark.parametrize(
    "name, dataset, num_steps, flip",
    [
        ("celebahq256", "celeb_a_hq/256", 500_000, True),
        ("lsun_church256", "lsun/church_outdoor", 1_200_000, True),
        ("lsun_bedroom256", "lsun/bedroom", 2_400_000, False),
    ],
)
def test_256_configs_are_the_paper_settings(name, dataset, num_steps, flip):
    c = _module(name).get_config()
    assert (c.data.dataset, c.data.image_size, c.data.batch_size) == (dataset, 256, 64)
    assert c.data.random_flip == flip
    assert (c.model.ch, tuple(c.model.ch_mult)) == (128, (1, 1, 2, 2, 4, 4))
    assert c.model.num_res_blocks == 2 and tuple(c.model.attn_resolutions) == (16,)
    assert c.model.dropout == 0.0
    assert (c.optim.lr, c.optim.warmup_steps, c.optim.grad_clip) == (2e-5, 5000, 1.0)
    assert c.train.ema_decay == 0.9999 and c.train.num_steps == num_steps
    assert (c.diffusion.num_timesteps, c.diffusion.var_type) == (1000, "fixedsmall")
    assert round(_num_params(c) / 1e6) == 114  # "114 million parameters"
