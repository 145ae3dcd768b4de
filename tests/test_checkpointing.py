"""Checkpoints: exact round trips, retention policy, the run's config, params-only access,
damaged checkpoints."""

import json
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ddpm_jax import checkpointing


def _config(**model) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        {
            "seed": 0,
            "data": {"dataset": "mnist5k", "image_size": 28, "num_channels": 1,
                     "class_conditional": False, "batch_size": 8},
            "model": {"ch": 32, "ch_mult": (1, 2), "attn_resolutions": (), "dropout": 0.0,
                      "dtype": "float32", "num_classes": None, **model},
            "diffusion": {"schedule": "linear", "num_timesteps": 1000},
            "optim": {"lr": 2e-4},
            "train": {"num_steps": 10},
        }
    )


def _state(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    params = {"conv": {"kernel": rng.normal(size=(3, 3, 1, 4)).astype(np.float32)},
              "bias": rng.normal(size=(4,)).astype(np.float32)}
    params = jax.tree.map(jnp.asarray, params)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))
    opt_state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    _, opt_state = tx.update(grads, opt_state, params)  # non-trivial mu, nu, count
    return {"step": jnp.asarray(seed, jnp.int32), "params": params,
            "ema_params": jax.tree.map(lambda x: 0.5 * x, params), "opt_state": opt_state,
            "rng": jax.random.PRNGKey(seed)}


def _assert_trees_equal(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_save_restore_is_exact_and_keeps_structure_and_sharding(tmp_path):
    state = _state(3)
    with checkpointing.Checkpointer(tmp_path, max_to_keep=2) as ckpt:
        assert ckpt.latest_step() is None
        assert ckpt.save(3, state)
        ckpt.wait()
        assert ckpt.latest_step() == 3
        assert not ckpt.save(3, state)  # an existing step is never overwritten

    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    replicated = NamedSharding(mesh, P())
    template = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), _state(0)
    )
    with checkpointing.Checkpointer(tmp_path) as ckpt:
        restored = ckpt.restore(template)
    _assert_trees_equal(restored, state)
    assert type(restored["opt_state"][1][0]) is type(state["opt_state"][1][0])  # ScaleByAdamState
    assert all(x.sharding == replicated for x in jax.tree.leaves(restored))


def test_keeps_last_n_and_every_keep_period(tmp_path):
    with checkpointing.Checkpointer(tmp_path, max_to_keep=2, keep_period=4) as ckpt:
        for step in range(1, 11):
            ckpt.save(step, _state(step))
        ckpt.wait()
        assert sorted(ckpt.all_steps()) == [4, 8, 9, 10]
        assert ckpt.latest_step() == 10


def test_restore_without_checkpoint_fails_clearly(tmp_path):
    with checkpointing.Checkpointer(tmp_path) as ckpt, pytest.raises(FileNotFoundError):
        ckpt.restore(_state())


def test_config_round_trip_keeps_tuples(tmp_path):
    config = _config()
    checkpointing.write_config(tmp_path, config)
    loaded = checkpointing.read_config(tmp_path)
    assert loaded.model.ch_mult == (1, 2)
    assert loaded.to_dict() == config.to_dict()


def test_compatible_config_updates_the_workdir(tmp_path):
    checkpointing.write_config(tmp_path, _config())
    longer = _config(dropout=0.1, dtype="bfloat16")  # neither changes the parameters
    longer.train.num_steps = 20
    longer.optim.lr = 1e-4
    checkpointing.write_config(tmp_path, longer)
    assert checkpointing.read_config(tmp_path).train.num_steps == 20


def test_a_run_saved_before_label_dropout_existed_stays_resumable(tmp_path):
    """Its config.json has no model.p_uncond: it is read as 0, today's parameter shapes."""
    checkpointing.write_config(tmp_path, _config())
    checkpointing.write_config(tmp_path, _config(p_uncond=0.0))
    with pytest.raises(ValueError, match="model.p_uncond: 0.0 .saved. != 0.1"):
        checkpointing.write_config(tmp_path, _config(p_uncond=0.1))


@pytest.mark.parametrize(
    "change", [("model", "ch", 64), ("diffusion", "num_timesteps", 500), ("data", "image_size", 32)]
)
def test_incompatible_config_is_refused_and_not_overwritten(tmp_path, change):
    checkpointing.write_config(tmp_path, _config())
    before = (tmp_path / "config.json").read_text()
    section, field, value = change
    other = _config()
    other[section][field] = value
    with pytest.raises(ValueError, match=rf"(?s){section}\.{field}: .*new --workdir"):
        checkpointing.write_config(tmp_path, other)
    assert (tmp_path / "config.json").read_text() == before
    assert json.loads(before)[section][field] != value


def test_load_ema_params_from_workdir_or_step_dir(tmp_path):
    config = _config()
    checkpointing.write_config(tmp_path, config)
    with checkpointing.Checkpointer(tmp_path, config=config) as ckpt:
        ckpt.save(5, _state(5))
        ckpt.save(7, _state(7))
    ema, loaded_config, step = checkpointing.load_ema_params(tmp_path)
    assert step == 7 and loaded_config.model.ch_mult == (1, 2)
    _assert_trees_equal(ema, _state(7)["ema_params"])
    assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(ema))
    ema, _, step = checkpointing.load_ema_params(tmp_path / "checkpoints" / "5")
    assert step == 5
    _assert_trees_equal(ema, _state(5)["ema_params"])
    with pytest.raises(FileNotFoundError, match="No checkpoint"):
        checkpointing.load_ema_params(tmp_path / "nothing_here")


def test_params_checkpoint_is_loadable_but_not_resumable(tmp_path):
    config = _config()
    params = _state(1)["params"]
    step_dir = checkpointing.save_params_checkpoint(tmp_path, params, config, step=0)
    assert str(step_dir) == str(tmp_path / "checkpoints" / "0")
    ema, loaded_config, step = checkpointing.load_ema_params(tmp_path)
    assert step == 0 and loaded_config.to_dict() == config.to_dict()
    _assert_trees_equal(ema, params)
    with checkpointing.Checkpointer(tmp_path) as ckpt:
        with pytest.raises(ValueError, match="params-only"):
            ckpt.restore(_state())
        with pytest.raises(ValueError, match="params-only"):  # not damage: nothing moved aside
            ckpt.restore_latest(_state())
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["0"]
    with pytest.raises(FileExistsError):
        checkpointing.save_params_checkpoint(tmp_path, params, config, step=0)


# ----------------------------------------------------------------------------------------------
# Damaged checkpoints (tests/test_checkpoint_faults.py runs the commands on them).
# ----------------------------------------------------------------------------------------------
def _replicated_template() -> dict:
    replicated = NamedSharding(Mesh(np.asarray(jax.devices()), ("data",)), P())
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), _state(0)
    )


def _save_steps(workdir: Path, *steps: int) -> Path:
    with checkpointing.Checkpointer(workdir, max_to_keep=None) as ckpt:
        for step in steps:
            ckpt.save(step, _state(step))
    return workdir / "checkpoints"


def _overwrite_tree_file(step_dir: Path) -> Path:
    """Zeros the first 100 bytes of the file under state/d/ (the OCDBT database's tree)."""
    (tree_file,) = (step_dir / "state" / "d").iterdir()
    tree_file.write_bytes(bytes(100) + tree_file.read_bytes()[100:])
    return tree_file


def test_restore_latest_moves_damaged_checkpoints_aside_and_falls_back(tmp_path, caplog):
    ckpt_dir = _save_steps(tmp_path, 1, 2, 3)
    tree_file = _overwrite_tree_file(ckpt_dir / "3")
    (ckpt_dir / "2" / "state" / "_METADATA").unlink()
    (ckpt_dir / "3.damaged-1").mkdir()  # moved aside by an earlier run
    with checkpointing.Checkpointer(tmp_path, max_to_keep=None) as ckpt, caplog.at_level(
        logging.WARNING
    ):
        state, step = ckpt.restore_latest(_replicated_template())
        assert step == 1 and ckpt.all_steps() == [1]
        assert ckpt.save(2, _state(2))  # Orbax no longer lists the steps moved aside
    _assert_trees_equal(state, _state(1))
    assert sorted(p.name for p in ckpt_dir.iterdir()) == [
        "1", "2", "2.damaged-1", "3.damaged-1", "3.damaged-2"
    ]
    moved_tree_file = ckpt_dir / "3.damaged-2" / "state" / "d" / tree_file.name
    assert moved_tree_file.read_bytes()[:100] == bytes(100)  # renamed, not rewritten
    warnings = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
    assert len(warnings) == 2
    assert warnings[0].startswith(
        f"Checkpoint step 3 is damaged: moved it to {ckpt_dir / '3.damaged-2'} and resumed from "
        f"step 1. File: {tree_file} (array "
    )
    assert "Reason: DATA_LOSS: " in warnings[0]
    assert warnings[1].startswith(
        f"Checkpoint step 2 is damaged: moved it to {ckpt_dir / '2.damaged-1'} and resumed from "
        f"step 1. File: {ckpt_dir / '2' / 'state'}. Reason: FileNotFoundError: "
    )
    assert "_METADATA" in warnings[1]


def test_restore_latest_moves_nothing_when_no_checkpoint_restores(tmp_path):
    ckpt_dir = _save_steps(tmp_path, 1, 2)
    for step in (1, 2):
        _overwrite_tree_file(ckpt_dir / str(step))
    with checkpointing.Checkpointer(tmp_path) as ckpt:
        with pytest.raises(ValueError, match=(
            r"(?s)No checkpoint in .* can be restored; none was moved:\n"
            r"  checkpoint step 2 is damaged: .*DATA_LOSS.*\n"
            r"  checkpoint step 1 is damaged: .*DATA_LOSS.*\nFix what these errors name"
        )):
            ckpt.restore_latest(_replicated_template())
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["1", "2"]


def test_load_ema_params_names_the_damaged_checkpoint(tmp_path):
    ckpt_dir = _save_steps(tmp_path, 5)
    (ckpt_dir / "5" / "meta" / "metadata").unlink()
    with pytest.raises(checkpointing.DamagedCheckpointError) as caught:
        checkpointing.load_ema_params(tmp_path)
    error = caught.value
    assert isinstance(error, ValueError) and error.step == 5
    assert error.step_dir == ckpt_dir / "5"
    assert error.file == str(ckpt_dir / "5" / "meta" / "metadata")
    assert str(error).startswith(
        f"checkpoint step 5 is damaged: {error.file}: FileNotFoundError: "
    )
