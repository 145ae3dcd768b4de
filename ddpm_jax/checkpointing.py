"""Checkpoints of a training run: the one module that talks to Orbax.

A workdir names a run::

    workdir/config.json            the run's config (refused if a new config is incompatible)
    workdir/checkpoints/<step>/    state: params, EMA params, optimizer state, step, rng (Orbax)
                                   meta:  JSON with the step, the data-iterator position, the config

Saves are asynchronous (Orbax ``CheckpointManager``) and written collectively by all processes.
The last ``max_to_keep`` checkpoints are kept for preemption, plus every ``keep_period``-th step
for good. Training always resumes from the latest checkpoint of its workdir.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

PyTree = Any
PathLike = str | os.PathLike


def as_path(path: PathLike) -> epath.Path:
    """An absolute local path, or a cloud path (gs://...) as is."""
    if "://" in str(path):
        return epath.Path(path)
    return epath.Path(os.path.abspath(path))


CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
_STATE, _META = "state", "meta"

# Config fields that fix the parameters' shapes or their meaning: a workdir trained with one value
# cannot continue with another. model.dropout and model.dtype change neither, so they may differ.
_COMPATIBILITY_FIELDS = (
    "model",
    "diffusion",
    "data.image_size",
    "data.num_channels",
    "data.class_conditional",
)
_FREE_MODEL_FIELDS = ("dropout", "dtype")


# ----------------------------------------------------------------------------------------------
# The run's config (workdir/config.json).
# ----------------------------------------------------------------------------------------------
def _tuplify(value: Any) -> Any:
    """JSON arrays back to the tuples that configs use for sequences (e.g. ch_mult)."""
    if isinstance(value, list):
        return tuple(_tuplify(v) for v in value)
    if isinstance(value, dict):
        return {k: _tuplify(v) for k, v in value.items()}
    return value


def config_to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config as plain JSON-compatible Python (tuples become lists)."""
    return json.loads(config.to_json())


def config_from_dict(d: dict[str, Any]) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(_tuplify(d))


def read_config(workdir: PathLike) -> ml_collections.ConfigDict:
    """The config saved in ``workdir/config.json``."""
    path = as_path(workdir) / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"No {CONFIG_FILE} in {workdir}: is it a ddpm_jax workdir?")
    return config_from_dict(json.loads(path.read_text()))


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def incompatible_fields(
    saved: ml_collections.ConfigDict, new: ml_collections.ConfigDict
) -> list[str]:
    """'field: saved != new' for every field that stops ``new`` from continuing ``saved``'s run."""
    old_flat = _flatten(config_to_dict(saved))
    new_flat = _flatten(config_to_dict(new))
    free = {f"model.{f}" for f in _FREE_MODEL_FIELDS}
    diffs = []
    for key in sorted(set(old_flat) | set(new_flat)):
        checked = any(key == f or key.startswith(f + ".") for f in _COMPATIBILITY_FIELDS)
        if key in free or not checked:
            continue
        old, cur = old_flat.get(key, "<unset>"), new_flat.get(key, "<unset>")
        if old != cur:
            diffs.append(f"{key}: {old!r} (saved) != {cur!r} (new)")
    return diffs


def check_config_compatible(workdir: PathLike, config: ml_collections.ConfigDict) -> None:
    """Raises ValueError if ``workdir`` holds a run whose model, diffusion or data shape differ."""
    if not (as_path(workdir) / CONFIG_FILE).exists():
        return
    diffs = incompatible_fields(read_config(workdir), config)
    if diffs:
        raise ValueError(
            f"Workdir {workdir} holds a run with an incompatible config, refusing to touch it:\n  "
            + "\n  ".join(diffs)
            + "\nUse a new --workdir (or delete this one to start over)."
        )


def write_config(workdir: PathLike, config: ml_collections.ConfigDict) -> None:
    """Records ``config`` in ``workdir/config.json`` (process 0 writes; every process checks).

    Refuses (ValueError, nothing written) a workdir whose saved config is incompatible; a
    compatible one (e.g. more steps, another learning rate) is updated to the new config.
    """
    check_config_compatible(workdir, config)
    if jax.process_index() != 0:
        return
    path = as_path(workdir) / CONFIG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / (CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(config_to_dict(config), indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


# ----------------------------------------------------------------------------------------------
# Training-state checkpoints.
# ----------------------------------------------------------------------------------------------
def _top_level_keys(tree: PyTree) -> set[str]:
    """The names of a dict's keys or a dataclass's fields (how Orbax names a state's parts)."""
    if isinstance(tree, dict):
        return set(tree)
    return set(getattr(tree, "__dataclass_fields__", ()))


class Checkpointer:
    """Asynchronous Orbax checkpoints of a training state under ``workdir/checkpoints``.

    ``state`` is any pytree of arrays (the trainer's TrainState). ``config``, when given, is stored
    with every step so that a single step directory is self-describing (see ``load_ema_params``).
    """

    def __init__(
        self,
        workdir: PathLike,
        *,
        max_to_keep: int | None = 3,
        keep_period: int | None = None,
        config: ml_collections.ConfigDict | None = None,
    ):
        self.directory = as_path(workdir) / CHECKPOINT_DIR
        self._config = None if config is None else config_to_dict(config)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep,
                keep_period=keep_period,
                create=True,
                cleanup_tmp_directories=True,  # half-written saves of a killed run
            ),
            item_handlers={
                _STATE: ocp.StandardCheckpointHandler(),
                _META: ocp.JsonCheckpointHandler(),
            },
        )

    def latest_step(self) -> int | None:
        """The newest finalized checkpoint's step, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: PyTree, force: bool = False) -> bool:
        """Starts an asynchronous save of ``state`` at ``step``; False if that step already exists.

        ``force`` saves even where Orbax's save policy would skip the step.
        """
        step = int(step)
        if step in self._manager.all_steps():
            return False
        meta = {"step": step, "data_position": step, "config": self._config}
        return self._manager.save(
            step,
            args=ocp.args.Composite(
                **{_STATE: ocp.args.StandardSave(state), _META: ocp.args.JsonSave(meta)}
            ),
            force=force,
        )

    def restore(self, template: PyTree, step: int | None = None) -> PyTree:
        """The checkpoint at ``step`` (default: the latest) with ``template``'s structure and
        shardings. ``template`` may hold arrays or jax.ShapeDtypeStruct."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"No checkpoint in {self.directory}.")
        saved_keys = set(self._manager.item_metadata(step)[_STATE].tree)
        missing = _top_level_keys(template) - saved_keys
        if missing:
            raise ValueError(
                f"Checkpoint {self.directory / str(step)} has no {sorted(missing)} (it holds "
                f"{sorted(saved_keys)}): a params-only checkpoint (e.g. from "
                "`python -m ddpm_jax.convert`) can be sampled from but not resumed."
            )
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
        return self._manager.restore(
            step, args=ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(abstract)})
        )[_STATE]

    def wait(self) -> None:
        """Blocks until every started save is finalized on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------
# Params-only access (sampling, conversion).
# ----------------------------------------------------------------------------------------------
def _locate(path: epath.Path) -> tuple[epath.Path, int]:
    """(checkpoints dir, step) for a workdir (latest step) or one step directory."""
    if (path / _STATE).is_dir():
        if not path.name.isdigit():
            raise ValueError(f"{path} looks like a checkpoint but its name is not a step number.")
        return path.parent, int(path.name)
    ckpt_dir = path / CHECKPOINT_DIR
    steps = ocp.utils.checkpoint_steps(ckpt_dir) if ckpt_dir.is_dir() else []
    if not steps:
        raise FileNotFoundError(
            f"No checkpoint at {path}: pass a workdir holding {CHECKPOINT_DIR}/<step>/ or one "
            f"step directory such as {path / CHECKPOINT_DIR / '10000'}."
        )
    return ckpt_dir, max(steps)


def load_ema_params(
    path: PathLike,
) -> tuple[PyTree, ml_collections.ConfigDict, int]:
    """(EMA params as NumPy arrays, the run's config, step) from a workdir's latest checkpoint or
    from one checkpoint step directory. Reads only the EMA params, not the optimizer state."""
    ckpt_dir, step = _locate(as_path(path))
    manager = ocp.CheckpointManager(
        ckpt_dir,
        options=ocp.CheckpointManagerOptions(read_only=True),
        item_handlers={_STATE: ocp.PyTreeCheckpointHandler(), _META: ocp.JsonCheckpointHandler()},
    )
    try:
        tree = manager.item_metadata(step)[_STATE].tree
        if "ema_params" not in tree:
            raise ValueError(
                f"Checkpoint {ckpt_dir / str(step)} holds no ema_params: {sorted(tree)}."
            )
        ema_meta = tree["ema_params"]
        item = {"ema_params": jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), ema_meta)}
        restore_args = {
            "ema_params": jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), ema_meta)
        }
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                **{
                    _STATE: ocp.args.PyTreeRestore(
                        item=item, restore_args=restore_args, partial_restore=True
                    ),
                    _META: ocp.args.JsonRestore(),
                }
            ),
        )
    finally:
        manager.close()
    meta_config = restored[_META].get("config")
    if meta_config is not None:
        config = config_from_dict(meta_config)
    else:
        config = read_config(ckpt_dir.parent)
    return restored[_STATE]["ema_params"], config, step


def save_params_checkpoint(
    workdir: PathLike,
    params: PyTree,
    config: ml_collections.ConfigDict,
    step: int = 0,
) -> epath.Path:
    """Writes ``params`` (used as both params and EMA params) and ``config`` as a checkpoint that
    ``load_ema_params`` and ``python -m ddpm_jax.sample --workdir`` read. Returns the step dir."""
    write_config(workdir, config)
    with Checkpointer(workdir, max_to_keep=None, config=config) as ckpt:
        if step in ckpt.all_steps():
            raise FileExistsError(f"{ckpt.directory / str(step)} exists; refusing to overwrite it.")
        ckpt.save(step, {"params": params, "ema_params": params}, force=True)
        return ckpt.directory / str(step)


# ----------------------------------------------------------------------------------------------
# The best checkpoint by an evaluation figure.
# ----------------------------------------------------------------------------------------------
BEST_DIR = "best"
BEST_RECORD = "best.json"


def update_best(
    workdir: PathLike,
    step: int,
    ema_params: PyTree,
    config: ml_collections.ConfigDict,
    metric: str,
    value: float,
    lower_is_better: bool,
) -> bool:
    """Keeps ``ema_params`` as ``workdir/best`` (a params-only workdir that sample and evaluate
    read) when ``value`` beats the recorded best; returns whether it did. Every process calls it
    (the save is collective); ``best/best.json`` records metric, value and step."""
    best = as_path(workdir) / BEST_DIR
    record_path = best / BEST_RECORD
    if record_path.exists():
        record = json.loads(record_path.read_text())
        if record.get("metric") == metric:
            old = record["value"]
            if (value >= old) if lower_is_better else (value <= old):
                return False
    if not np.isfinite(value):
        return False
    write_config(best, config)
    with Checkpointer(best, max_to_keep=1, config=config) as ckpt:
        ckpt.save(step, {"params": ema_params, "ema_params": ema_params}, force=True)
    if jax.process_index() == 0:
        tmp = best / (BEST_RECORD + ".tmp")
        tmp.write_text(json.dumps({"metric": metric, "value": value, "step": int(step)}) + "\n")
        tmp.replace(record_path)
    return True
