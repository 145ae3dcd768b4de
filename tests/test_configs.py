"""Configs: the shared schema, the paper's settings, model sizes, self-describing docstrings, and
--config by name or path, also from an installed wheel."""

import importlib
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from absl import flags

from ddpm_jax import configs, diffusion, keys, sampling, train
from ddpm_jax.models import unet_from_config

ROOT = Path(__file__).resolve().parents[1]
NAMES = ("cifar10", "celebahq256", "lsun_church256", "lsun_bedroom256", "mnist", "mnist5k", "tiny")
PAPER_256 = ("celebahq256", "lsun_church256", "lsun_bedroom256")
SCHEMA = {
    "seed": None,
    "data": {"dataset", "split", "data_dir", "image_size", "num_channels", "random_flip",
             "batch_size", "shuffle_buffer", "class_conditional"},
    "model": {"ch", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout",
              "resamp_with_conv", "num_classes", "p_uncond", "dtype", "remat"},
    "diffusion": {"schedule", "num_timesteps", "beta_start", "beta_end", "mean_type", "var_type"},
    "optim": {"lr", "warmup_steps", "grad_clip", "clip_groups", "b1", "b2", "eps"},
    "train": {"num_steps", "log_every", "checkpoint_every", "keep_checkpoints", "keep_period",
              "sample_every", "ema_decay", "steps_per_dispatch", "prng_impl"},
    "sample": {"sampler", "num_steps", "eta", "order", "spacing", "clip_denoised", "num_images",
               "guidance", "guidance_interval"},
    "eval": {"every_steps", "metrics", "num_samples", "batch_size", "sampler", "num_steps", "eta",
             "order", "spacing", "convention", "reference", "inception_weights", "keep_best"},
}


def _module(name: str):
    return importlib.import_module(f"ddpm_jax.configs.{name}")


def _parse_config_flag(argv: list[str], monkeypatch) -> flags.FlagValues:
    """The trainer's --config flag, parsed from ``argv`` (ml_collections reads the
    --config.field=value overrides from sys.argv)."""
    argv = ["ddpm-train", *argv]
    monkeypatch.setattr(sys, "argv", argv)
    values = flags.FlagValues()
    train.define_config_flag(values)
    values(argv)
    return values


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


def test_the_shipped_configs_are_these():
    assert configs.names() == sorted(NAMES)


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
    boundaries = (train_config.num_steps, train_config.log_every, train_config.checkpoint_every,
                  train_config.sample_every or 0, config.eval.every_steps or 0)
    assert all(b % train_config.steps_per_dispatch == 0 for b in boundaries)  # one compile
    assert train_config.prng_impl in keys.IMPLS
    assert _num_params(config) > 0  # the UNet is valid at this image size


@pytest.mark.parametrize("name", NAMES)
def test_docstring_gives_command_hardware_time_and_result(name):
    doc = _module(name).__doc__
    for heading in ("Command:", "Hardware:", "Time:", "Result:"):
        assert heading in doc, heading
    if name == "mnist5k":
        assert "python -m ddpm_jax.train " in doc  # the no-argument default
    else:
        assert f"python -m ddpm_jax.train --config={name} " in doc


def test_the_default_config_is_mnist5k():
    assert train.DEFAULT_CONFIG == configs.DIRECTORY / "mnist5k.py"
    assert configs.DIRECTORY == Path(train.__file__).resolve().parent / "configs"  # in the package
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


@pytest.mark.parametrize("argument, name, expected", [
    ("cifar10", "cifar10", lambda: _module("cifar10").get_config()),
    ("mnist5k:unconditional", "mnist5k_unconditional",
     lambda: _module("mnist5k").get_config("unconditional")),
    # The paths in a clone.
    (str(ROOT / "configs" / "cifar10.py"), "cifar10", lambda: _module("cifar10").get_config()),
    (str(ROOT / "configs" / "mnist5k.py:unconditional"), "mnist5k_unconditional",
     lambda: _module("mnist5k").get_config("unconditional")),
])
def test_config_by_name_or_path_and_its_default_workdir(argument, name, expected, monkeypatch):
    values = _parse_config_flag([f"--config={argument}"], monkeypatch)
    assert train.default_run_name(values["config"]) == name
    assert values.config.to_dict() == expected().to_dict()


def test_a_config_file_anywhere_can_build_on_a_shipped_one(tmp_path, monkeypatch):
    path = tmp_path / "my_run.py"
    path.write_text(
        "from ddpm_jax.configs import tiny\n\n\n"
        "def get_config(lr):\n"
        "    config = tiny.get_config()\n"
        "    config.optim.lr = float(lr)\n"
        "    return config\n"
    )
    values = _parse_config_flag([f"--config={path}:0.5"], monkeypatch)
    assert train.default_run_name(values["config"]) == "my_run_0.5"
    assert values.config.optim.lr == 0.5 and values.config.data.image_size == 16


@pytest.mark.parametrize("argv, field, value", [
    # Fields that may be None take a value: num_classes on an unconditional config, and the
    # sampling steps where None means all 1000.
    (["--config=mnist5k:unconditional", "--config.model.num_classes=10"], "model.num_classes", 10),
    (["--config=cifar10", "--config.sample.num_steps=100"], "sample.num_steps", 100),
    (["--config=mnist", "--config.eval.sampler=ddpm"], "eval.sampler", "ddpm"),
    (["--config.sample.num_steps=20", "--config.optim.lr=1e-4"], "optim.lr", 1e-4),  # default
])
def test_fields_can_be_overridden(argv, field, value, monkeypatch):
    config = _parse_config_flag(argv, monkeypatch).config
    section, key = field.split(".")
    assert config[section][key] == value


def test_an_unknown_config_names_the_shipped_ones(monkeypatch):
    with pytest.raises(flags.IllegalFlagValueError,
                       match=r"'cifar100' is neither a file nor .*\(celebahq256, cifar10, "):
        _parse_config_flag(["--config=cifar100"], monkeypatch)


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


@pytest.mark.slow
def test_an_installed_wheel_trains_by_default_and_finds_the_configs_by_name(tmp_path):
    """`pip install` of a wheel, not a clone: the default command trains (2 steps) in another
    directory, and --config=cifar10 resolves to the installed copy's file."""
    source = tmp_path / "source"  # the wheel's inputs, so that the build writes nothing here
    shutil.copytree(ROOT / "ddpm_jax", source / "ddpm_jax",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source)
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist",
                    source], check=True)
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    assert "ddpm_jax/configs/cifar10.py" in zipfile.ZipFile(wheel).namelist()
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", site, wheel], check=True)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = dict(
        os.environ,
        PYTHONPATH=str(site),  # the installed copy ahead of the repository's editable install
        XLA_FLAGS=re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                         os.environ.get("XLA_FLAGS", "")),  # the CPU as it is
    )

    def run(*command: str) -> subprocess.CompletedProcess:
        return subprocess.run(command, env=env, cwd=elsewhere, capture_output=True, text=True,
                              timeout=300)

    probe = run(sys.executable, "-c", (
        "from absl import flags\n"
        "from ddpm_jax import train\n"
        "flags.FLAGS(['ddpm-train', '--config=cifar10'])\n"
        "print(train.__file__, train.default_run_name(flags.FLAGS['config']),"
        " flags.FLAGS.config.data.dataset, flags.FLAGS.config.model.ch_mult)"
    ))
    assert probe.returncode == 0, probe.stderr[-3000:]
    path, name, dataset, ch_mult = probe.stdout.split(maxsplit=3)
    assert Path(path).is_relative_to(site)
    assert (name, dataset, ch_mult.strip()) == ("cifar10", "cifar10", "(1, 2, 2, 2)")

    result = run(sys.executable, "-m", "ddpm_jax.train", "--config.train.num_steps=2",
                 "--config.train.log_every=1", "--config.eval.every_steps=0",
                 "--config.sample.num_images=4", "--config.sample.num_steps=3",
                 f"--config.data.data_dir={tmp_path / 'tfds'}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 2/2" in result.stderr
    assert (elsewhere / "runs" / "mnist5k" / "checkpoints" / "2").is_dir()
