"""Checkpoints of a training run: the one module that talks to Orbax.

A workdir names a run::

    workdir/config.json            the run's config (refused if a new config is incompatible)
    workdir/checkpoints/<step>/    state: params, EMA params, optimizer state, step, rng (Orbax)
                                   meta:  JSON with the step (where the data resume) and the config

Saves are asynchronous (Orbax ``CheckpointManager``) and written collectively by all processes.
The last ``max_to_keep`` checkpoints are kept for preemption, plus every ``keep_period``-th step
for good. A save that fails (e.g. a full disk) is a ``CheckpointSaveError`` and leaves the earlier
checkpoints as they were. Training resumes from the newest checkpoint that reads back completely;
newer ones that do not are renamed ``<step>.damaged-<n>`` (never deleted; Orbax no longer lists
them). A checkpoint that does not read back is a ``DamagedCheckpointError`` (step, file, reason).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import time
from collections.abc import Coroutine, Iterator, Sequence
from typing import Any, TypeVar

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

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

# Config fields that fix the state's shapes or their meaning: a workdir trained with one value
# cannot continue with another. model.dropout and model.dtype change neither, so they may differ.
# train.prng_impl fixes the checkpointed key's data (uint32[2] threefry2x32, [4] rbg).
_COMPATIBILITY_FIELDS = (
    "model",
    "diffusion",
    "data.image_size",
    "data.num_channels",
    "data.class_conditional",
    "train.prng_impl",
)
_FREE_MODEL_FIELDS = ("dropout", "dtype")
# Fields added later, with the value that runs saved before them had.
_ADDED_FIELDS = {"model.p_uncond": 0.0, "train.prng_impl": "threefry2x32"}


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
    old_flat = _ADDED_FIELDS | _flatten(config_to_dict(saved))
    new_flat = _ADDED_FIELDS | _flatten(config_to_dict(new))
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
# Reading checkpoints back, and the errors of a failed read or write.
# ----------------------------------------------------------------------------------------------
_T = TypeVar("_T")
_SETTLE_TIMEOUT_S = 600.0


async def _settled(coro: Coroutine[Any, Any, _T]) -> _T:
    """``await coro``; when it fails, first wait for every task it started.

    Orbax reads a checkpoint's arrays as concurrent TensorStore reads under ``asyncio.gather``,
    which raises at the first failure and leaves the other reads running; Orbax then closes its
    event loop, and every read that completes later calls back into the closed loop from a
    TensorStore thread, printing "RuntimeError: Event loop is closed" with a traceback. Letting
    the reads finish first closes the loop with nothing in flight.
    """
    before = asyncio.all_tasks()  # with the current task
    try:
        return await coro
    except Exception:
        deadline = time.monotonic() + _SETTLE_TIMEOUT_S  # a bound, should a read never end
        while (started := asyncio.all_tasks() - before) and time.monotonic() < deadline:
            await asyncio.wait(started, timeout=deadline - time.monotonic())
        raise


class _Settled:
    """Mixin for an Orbax TypeHandler: its metadata and array reads fail only once settled."""

    async def metadata(self, infos: Sequence[Any]) -> Sequence[Any]:
        return await _settled(super().metadata(infos))

    async def deserialize(self, infos: Sequence[Any], args: Sequence[Any] | None = None) -> Any:
        return await _settled(super().deserialize(infos, args))


class _SettledArrayHandler(_Settled, ocp.type_handlers.ArrayHandler):
    pass


class _SettledNumpyHandler(_Settled, ocp.type_handlers.NumpyHandler):
    pass


# What reads use: states are read as jax.Arrays, EMA params as NumPy arrays (Orbax makes one
# handler call per type, so each read is one settled call). These lack Orbax's ArrayMetadata
# store, which only typed PRNG key arrays need; states hold uint32 key data. Saves keep Orbax's
# own handlers.
_READ_TYPES = ocp.type_handlers.create_type_handler_registry(
    (jax.Array, _SettledArrayHandler()), (np.ndarray, _SettledNumpyHandler())
)

_TENSORSTORE_SPEC = re.compile(r"\s*\[tensorstore_spec=.*\]\s*$", re.DOTALL)
# TensorStore names files as `local file "<path>"`; Python and Orbax name them bare.
_FILE = re.compile(r'local file "([^"]+)"|(?<![\w"])(/[^\s"\']*[^\s"\'.,:;)])')
_OCDBT_KEY = re.compile(r'Error reading "([^"/]+)/[^"]*" in OCDBT')


def _file_and_reason(error: BaseException, default_file: epath.Path) -> tuple[str, str]:
    """The most specific file an Orbax/TensorStore error names (else ``default_file``; with the
    array, for a value inside Orbax's OCDBT database), and the error's message."""
    while error.__cause__ is not None:  # Orbax wraps TensorStore's error in its own
        error = error.__cause__
    reason = _TENSORSTORE_SPEC.sub("", str(error))
    if type(error) is not ValueError:  # TensorStore's ValueErrors start with their status
        reason = f"{type(error).__name__}: {reason}"
    if getattr(error, "filename", None):
        return str(error.filename), reason
    files = [quoted or bare for quoted, bare in _FILE.findall(reason)]
    if not files:
        return str(default_file), reason
    key = _OCDBT_KEY.search(reason)
    return files[-1] + (f" (array {key.group(1)})" if key else ""), reason


class DamagedCheckpointError(ValueError):
    """A checkpoint whose files do not read back: ``step``, ``step_dir``, ``file``, ``reason``."""

    def __init__(self, step_dir: epath.Path, error: BaseException):
        self.step_dir, self.step = step_dir, int(step_dir.name)
        self.file, self.reason = _file_and_reason(error, step_dir)
        super().__init__(f"checkpoint step {self.step} is damaged: {self.file}: {self.reason}")


class CheckpointSaveError(OSError):
    """A checkpoint that could not be written (e.g. no space left on the device)."""


@contextlib.contextmanager
def _reading(step_dir: epath.Path) -> Iterator[ocp.PyTreeCheckpointHandler]:
    """A state handler for ``step_dir`` whose failed reads settle; a failure inside the block is
    a DamagedCheckpointError."""
    handler = ocp.PyTreeCheckpointHandler(type_handler_registry=_READ_TYPES)
    try:
        yield handler
    except Exception as e:
        raise DamagedCheckpointError(step_dir, e) from None
    finally:
        handler.close()


def _on_all_processes(ok: bool) -> bool:
    """Whether ``ok`` holds on every process (a collective when there are several)."""
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


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
        self._saving: int | None = None  # the step of the last save started
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

        ``force`` saves even where Orbax's save policy would skip the step. CheckpointSaveError if
        this save, or the previous one, failed.
        """
        step = int(step)
        if step in self._manager.all_steps():
            return False
        self.wait()
        meta = {"step": step, "config": self._config}  # the data restart at "step" too
        with self._save_errors(step):
            started = self._manager.save(
                step,
                args=ocp.args.Composite(
                    **{_STATE: ocp.args.StandardSave(state), _META: ocp.args.JsonSave(meta)}
                ),
                force=force,
            )
        self._saving = step if started else self._saving
        return started

    def restore(self, template: PyTree, step: int | None = None) -> PyTree:
        """The checkpoint at ``step`` (default: the latest) with ``template``'s structure and
        shardings. ``template`` may hold arrays or jax.ShapeDtypeStruct. DamagedCheckpointError if
        its files do not read back."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"No checkpoint in {self.directory}.")
        step_dir = self.directory / str(step)
        if not step_dir.is_dir():
            raise FileNotFoundError(f"No checkpoint of step {step} in {self.directory}.")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
        with _reading(step_dir) as handler:
            saved_keys = set(handler.metadata(step_dir / _STATE).tree)
            missing = _top_level_keys(template) - saved_keys
            if not missing:
                return handler.restore(step_dir / _STATE, args=ocp.args.PyTreeRestore(
                    item=abstract, restore_args=restore_args
                ))
        raise ValueError(
            f"Checkpoint {step_dir} has no {sorted(missing)} (it holds {sorted(saved_keys)}): a "
            "params-only checkpoint (e.g. from `python -m ddpm_jax.convert`) can be sampled from "
            "but not resumed."
        )

    def restore_latest(self, template: PyTree) -> tuple[PyTree, int]:
        """(state, step) of the newest checkpoint that restores completely (see ``restore``).

        Each newer one is renamed ``<step>.damaged-<n>``, with one warning naming the step, the
        file and the reason. If none restores, a ValueError lists what was tried and nothing is
        renamed: a failure common to all (e.g. unreadable storage) is no sign of damage.
        """
        failed: list[DamagedCheckpointError] = []
        for step in sorted(self.all_steps(), reverse=True):
            try:
                state, error = self.restore(template, step), None
            except DamagedCheckpointError as e:
                state, error = None, e
            if _on_all_processes(error is None):
                break
            failed.append(error or DamagedCheckpointError(
                self.directory / str(step), RuntimeError("another process could not read it")
            ))
        else:
            if not failed:
                raise FileNotFoundError(f"No checkpoint in {self.directory}.")
            raise ValueError(
                f"No checkpoint in {self.directory} can be restored; none was moved:\n  "
                + "\n  ".join(str(e) for e in failed)
                + "\nFix what these errors name, or move the damaged step directories aside "
                "(with none left, the run starts again from step 0)."
            )
        for error in failed:
            moved = self._move_aside(error.step_dir)
            logging.warning(
                "Checkpoint step %d is damaged: moved it to %s and resumed from step %d. "
                "File: %s. Reason: %s", error.step, moved, step, error.file, error.reason,
            )
        if failed:
            if jax.process_count() > 1:
                multihost_utils.sync_global_devices("ddpm_jax: damaged checkpoints moved aside")
            self._manager.reload()
        return state, step

    def _move_aside(self, step_dir: epath.Path) -> epath.Path:
        """Renames ``step_dir`` to ``<step>.damaged-<n>``, the first free n (process 0 does)."""
        n = 1
        while (target := step_dir.parent / f"{step_dir.name}.damaged-{n}").exists():
            n += 1
        if jax.process_index() == 0:
            step_dir.rename(target)
        return target

    @contextlib.contextmanager
    def _save_errors(self, step: int | None) -> Iterator[None]:
        """Orbax's failure to write ``step`` as a CheckpointSaveError saying what is left."""
        try:
            yield
        except Exception as e:
            file, reason = _file_and_reason(e, self.directory / str(step))
            kept = sorted(ocp.utils.checkpoint_steps(self.directory))
            then = f"resumes from step {kept[-1]}" if kept else "starts again from step 0"
            raise CheckpointSaveError(
                f"Could not save the checkpoint of step {step} in {self.directory}: {file}: "
                f"{reason}. The earlier checkpoints (steps {kept}) are intact: free space there "
                f"(or fix the storage) and rerun the same command; it {then}."
            ) from None

    def wait(self) -> None:
        """Blocks until every started save is finalized on disk; CheckpointSaveError if one
        failed."""
        with self._save_errors(self._saving):
            self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for the last save (CheckpointSaveError if it failed), then ends Orbax's threads."""
        try:
            self.wait()
        finally:
            self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------
# Params-only access (sampling, conversion).
# ----------------------------------------------------------------------------------------------
def checkpoint_steps(checkpoint_dir: PathLike) -> list[int]:
    """The finalized steps in a ``checkpoints`` directory, oldest first (none if it is missing)."""
    path = as_path(checkpoint_dir)
    return sorted(ocp.utils.checkpoint_steps(path)) if path.is_dir() else []


def _locate(path: epath.Path) -> tuple[epath.Path, int]:
    """(checkpoints dir, step) for a workdir (latest step) or one step directory."""
    if (path / _STATE).is_dir():
        if not path.name.isdigit():
            raise ValueError(f"{path} looks like a checkpoint but its name is not a step number.")
        return path.parent, int(path.name)
    steps = checkpoint_steps(path / CHECKPOINT_DIR)
    if not steps:
        raise FileNotFoundError(
            f"No checkpoint at {path}: pass a workdir holding {CHECKPOINT_DIR}/<step>/ or one "
            f"step directory such as {path / CHECKPOINT_DIR / '10000'}."
        )
    return path / CHECKPOINT_DIR, steps[-1]


def load_ema_params(
    path: PathLike,
) -> tuple[PyTree, ml_collections.ConfigDict, int]:
    """(EMA params as NumPy arrays, the run's config, step) from a workdir's latest checkpoint or
    from one checkpoint step directory. Reads only the EMA params, not the optimizer state.
    DamagedCheckpointError if that checkpoint's files do not read back."""
    ckpt_dir, step = _locate(as_path(path))
    step_dir = ckpt_dir / str(step)
    with _reading(step_dir) as handler:
        tree = handler.metadata(step_dir / _STATE).tree
        if "ema_params" in tree:
            ema_meta = tree["ema_params"]
            item = {"ema_params": jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), ema_meta)}
            as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), ema_meta)
            ema_params = handler.restore(step_dir / _STATE, args=ocp.args.PyTreeRestore(
                item=item, restore_args={"ema_params": as_numpy}, partial_restore=True
            ))["ema_params"]
            meta = ocp.JsonCheckpointHandler().restore(step_dir / _META)
    if "ema_params" not in tree:
        raise ValueError(f"Checkpoint {step_dir} holds no ema_params: {sorted(tree)}.")
    meta_config = meta.get("config")
    if meta_config is not None:
        config = config_from_dict(meta_config)
    else:
        config = read_config(ckpt_dir.parent)
    return ema_params, config, step


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
