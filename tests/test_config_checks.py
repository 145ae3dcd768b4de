"""Every config field checked at start (ddpm_jax.config_checks, issue 22): every shipped config
passes; every value a field does not take, generated from the field table and from a hand-written
list of nonsense, is refused by each program's start-up check with one line naming the field,
before anything is written."""

import importlib
import math

import ml_collections
import pytest

from ddpm_jax import checkpointing, config_checks, configs, training

NAMES = configs.names()
# Values no field should be surprised by: each is either one the field takes, or a one-line
# ValueError naming it (or, for a value of another type, ml_collections' TypeError).
NONSENSE = [-1, 0, 10**9, -0.5, 1e30, math.nan, -math.inf, math.inf, "", " ", "nonsense",
            "fid,,is", None, (), (0,), (-3, 7), (1.5,), True]


def _config(name: str) -> ml_collections.ConfigDict:
    return importlib.import_module(f"ddpm_jax.configs.{name}").get_config()


def _set(config: ml_collections.ConfigDict, path: str, value) -> bool:
    """Sets ``path`` to ``value``; False when ml_collections' type check refuses it."""
    *sections, key = path.split(".")
    node = config
    for section in sections:
        node = node[section]
    try:
        node[key] = value
    except TypeError:
        return False
    return True


def _one_line_error(config, program, **kw) -> str:
    with pytest.raises(ValueError) as e:
        config_checks.check_config(config, program, **kw)
    message = str(e.value)
    assert "\n" not in message, message
    return message


@pytest.fixture
def no_write(monkeypatch):
    """The trainer's first write fails the test: a start-up check must refuse the value first."""

    def refuse(*args, **kwargs):
        raise AssertionError("the trainer got as far as writing its workdir")

    monkeypatch.setattr(checkpointing, "write_config", refuse)


@pytest.mark.parametrize("name", NAMES)
def test_every_shipped_config_passes_every_program(name):
    for program in config_checks.PROGRAMS:
        config_checks.check_config(_config(name), program, device_count=8)


def test_the_table_states_every_field_of_every_shipped_config():
    stated = {f.path for f in config_checks.FIELDS} | set(config_checks.SAMPLING_FIELDS)
    for name in NAMES:
        paths = set()
        for key, value in _config(name).items():
            if isinstance(value, ml_collections.ConfigDict):
                paths |= {f"{key}.{field}" for field in value.keys()}
            else:
                paths.add(key)
        assert paths == stated, name


@pytest.mark.parametrize("name", NAMES)
def test_every_value_a_field_does_not_take_is_refused_naming_it(name, tmp_path, no_write):
    refused = 0
    for field in config_checks.FIELDS:
        generated = field.out_of_range()
        assert generated or field.kind in (bool, str), field.path  # every range is exercised
        for value in generated + NONSENSE:
            config = _config(name)
            if not _set(config, field.path, value):
                continue  # ml_collections' type check refused it
            stored = config_checks._get(config, field.path)
            for program in field.read_by:
                if field.accepts(stored):
                    try:  # a value the field takes: a relation may still refuse it, by name
                        config_checks.check_config(config, program, device_count=8)
                    except ValueError as e:
                        assert "\n" not in str(e) and "config." in str(e), str(e)
                    assert value not in generated, (field.path, value)
                    continue
                message = _one_line_error(config, program, device_count=8)
                assert message.startswith(f"config.{field.path}={stored!r} is not "), message
                assert field.allowed() in message
                refused += 1
            if not field.accepts(stored):
                run = tmp_path / "run"
                with pytest.raises(ValueError, match=f"config.{field.path}="):
                    training.train_and_evaluate(config, run)  # the trainer's own start-up path
                assert not run.exists()
    assert refused > 100


@pytest.mark.parametrize("name", ["tiny", "cifar10", "mnist5k"])
def test_the_sampling_fields_are_checked_through_the_sampler_hook(name):
    """The sampler's own validation decides what the sampling fields take (see
    config_checks.check_sampling_fields); here: whatever it refuses is one line naming its config
    section, never another exception."""
    for path in config_checks.SAMPLING_FIELDS:
        for value in NONSENSE:
            config = _config(name)
            if not _set(config, path, value):
                continue
            try:
                config_checks.check_config(config, "train", device_count=8)
            except ValueError as e:
                assert str(e).startswith("config.") and "\n" not in str(e), str(e)
    config = _config(name)
    config.sample.sampler = "euler"
    assert "Unknown sampler 'euler'" in _one_line_error(config, "train")


@pytest.mark.parametrize("override, message", [
    (dict(data=dict(image_size=30)), "config.data.image_size=30 must be a multiple of 4: the UNet "
     "of config.model.ch_mult=(1, 1, 2) halves it 2 times and doubles it back. Use image_size=28 "
     "or 32"),
    (dict(model=dict(attn_resolutions=(8,))), "config.model.attn_resolutions=(8,) names [8], "
     "which the UNet never has: its resolutions are [28, 14, 7]"),
    (dict(model=dict(ch_mult=(1, 1.5))), "config.model.ch_mult=(1, 1.5) is not a non-empty tuple "
     "of integers >= 1"),  # ml_collections checks only that it is a tuple
    (dict(diffusion=dict(beta_start=0.5)), "config.diffusion.beta_start=0.5 must be <= "
     "config.diffusion.beta_end=0.02"),
    (dict(model=dict(num_classes=None, p_uncond=0.1)), "config.model.p_uncond=0.1 (label "
     "dropout for classifier-free guidance) needs a class-conditional model"),
    (dict(data=dict(batch_size=36)), "config.data.batch_size=36 must be a positive multiple of "
     "the number of devices (8)"),
    (dict(data=dict(dataset="folder:/no/such/folder")), "config.data.dataset='folder:/no/such/"
     "folder': '/no/such/folder' is not a directory."),
    (dict(eval=dict(metrics="fid", inception_weights="/no/such.npz")),
     "config.eval.inception_weights: /no/such.npz does not exist or is not a file."),
    (dict(eval=dict(metrics="bpd")), "config.eval.metrics='bpd' is not a comma-separated list of "
     "fid, is, kid, digits. It is the metrics of evaluations in training (bpd: only `python -m "
     "ddpm_jax.evaluate --metrics=bpd`)."),
])
def test_relations_between_fields_are_refused_by_name(override, message):
    config = _config("mnist5k")
    for section, fields in override.items():
        config[section].update(fields)
    assert message in _one_line_error(config, "train", device_count=8)


def test_a_field_no_program_reads_is_refused_in_training():
    config = _config("tiny")
    config.optim.lrr = 1e-3  # a config file's typo: ml_collections cannot see it
    assert _one_line_error(config, "train") == (
        "config.optim.lrr is not a field any program reads (a typo?): config.optim has b1, b2, "
        "clip_groups, eps, grad_clip, lr, warmup_steps.")


def test_a_checkpoints_config_is_checked_for_what_sampling_reads():
    config = _config("tiny")
    config.optim.lr = -1.0  # a training field: not sample's or evaluate's business
    del config["eval"]  # an older checkpoint's config may lack fields
    for program in ("sample", "evaluate"):
        config_checks.check_config(config, program)
    config.model.ch = 48
    message = _one_line_error(config, "sample")
    assert message == ("config.model.ch=48 is not an integer multiple of 32 >= 32. It is the "
                       f"UNet's base width. {config_checks.CHECKPOINT_FIX}")


def test_a_program_flag_is_checked_as_the_field_it_stands_for():
    config_checks.check_value("data.num_channels", 3, name="--num_channels")
    with pytest.raises(ValueError, match=r"^--num_channels=2 is not one of 1, 3\. It is the"):
        config_checks.check_value("data.num_channels", 2, name="--num_channels")
