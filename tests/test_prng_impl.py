"""config.train.prng_impl: the run's key implementation, checkpointed with the state; runs from
before the field (no record) resume on threefry2x32, bit-identically; another one is refused."""

import jax
import numpy as np
import pytest

from ddpm_jax import checkpointing, keys, training
from test_train import tiny_config

INTERVALS = dict(log_every=2, checkpoint_every=2, sample_every=0)


def _before_the_field(num_steps: int):
    """The tiny config as configs were before config.train.prng_impl existed."""
    config = tiny_config(num_steps=num_steps, **INTERVALS)
    del config.train["prng_impl"]
    return config


def test_a_run_from_before_the_field_resumes_on_threefry_bit_identically(tmp_path):
    straight = training.train_and_evaluate(_before_the_field(4), tmp_path / "straight")
    training.train_and_evaluate(_before_the_field(2), tmp_path / "resumed")
    assert "prng_impl" not in (tmp_path / "resumed" / "config.json").read_text()
    resumed = training.train_and_evaluate(tiny_config(num_steps=4, **INTERVALS),
                                          tmp_path / "resumed")
    assert checkpointing.read_config(tmp_path / "resumed").train.prng_impl == "threefry2x32"
    assert int(straight.step) == int(resumed.step) == 4 and resumed.rng.shape == (2,)
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_an_rbg_run_checkpoints_its_key_and_refuses_another_impl(tmp_path):
    config = tiny_config(num_steps=2, **INTERVALS)
    config.train.prng_impl = "rbg"
    state = training.train_and_evaluate(config, tmp_path)
    assert state.rng.shape == (4,) and state.rng.dtype == np.uint32
    _, saved, _ = checkpointing.load_ema_params(tmp_path)
    assert saved.train.prng_impl == "rbg"
    threefry = tiny_config(num_steps=4, **INTERVALS)
    with pytest.raises(ValueError, match=r"train\.prng_impl: 'rbg' \(saved\) != 'threefry2x32'"):
        training.train_and_evaluate(threefry, tmp_path)
    config.train.num_steps = 4
    assert int(training.train_and_evaluate(config, tmp_path).step) == 4


def test_the_impls_are_jax_key_impl_names():
    for impl in keys.IMPLS:
        assert str(jax.random.key_impl(keys.stream(0, keys.TRAIN, impl))) == impl
