"""Sharded, chunked, resumable sample generation: what ``python -m ddpm_jax.sample`` and
``python -m ddpm_jax.evaluate`` draw their images with.

``generate_samples`` writes, under ``out``:

    samples_00000.npz, ...   one chunk per batch: uint8 NHWC images under "arr_0" (+ "labels")
    samples.npz              exactly num_samples images, "arr_0" uint8 NHWC (+ "labels"): the
                             format FID tools read
    grid.png                 the first 64 samples
    trajectory_x_t.png,      with trajectory=True: the denoising film of the first samples (x_t
    trajectory_pred_x0.png   and the predicted x_0 every few steps, then the final sample)
    sampling.json            the settings the chunks were drawn with (sampler, steps, labels,
                             guidance scale, ...)

Chunk c is drawn with the key fold_in(keys.stream(seed, keys.SAMPLE), c), so a rerun after
preemption skips the chunks on disk and produces the same images as an uninterrupted run;
rerunning with other settings into the same ``out`` is refused. Each batch is split over all
devices of all processes (a 1-D ('data',) mesh; params replicated); the sampler is compiled
once; process 0 writes the files.
"""

from __future__ import annotations

import json
import math
import os
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from ddpm_jax import (
    checkpointing,
    diffusion,
    files,
    images,
    input_files,
    keys,
    parallel,
    sampler_spec,
    sampling,
)
from ddpm_jax.models import unet_from_config

PyTree = Any

GRID_IMAGES = 64
TRAJECTORY_ROWS = 8
SETTINGS_FILE = "sampling.json"
MERGED_FILE = "samples.npz"


def chunk_path(out: str | os.PathLike, chunk: int) -> Path:
    return Path(out) / f"samples_{chunk:05d}.npz"


# ----------------------------------------------------------------------------------------------
# Checkpoint and sample directory.
# ----------------------------------------------------------------------------------------------
def load_checkpoint(path: str | os.PathLike) -> tuple[PyTree, ml_collections.ConfigDict, int]:
    """(EMA params, config, step) of a workdir's latest checkpoint or of one step directory.

    A damaged checkpoint is a ValueError naming its step, the file, the reason and another
    checkpoint to pass as ``--checkpoint``."""
    if not Path(path).exists():
        raise FileNotFoundError(f"Checkpoint path {path} does not exist.")
    try:
        return checkpointing.load_ema_params(path)
    except FileNotFoundError:
        raise
    except checkpointing.DamagedCheckpointError as e:
        ckpt_dir = e.step_dir.parent
        others = [s for s in checkpointing.checkpoint_steps(ckpt_dir) if s != e.step]
        advice = (
            f"Use another checkpoint: --checkpoint={ckpt_dir / str(others[-1])} (with --out)."
            if others else f"{ckpt_dir} holds no other checkpoint."
        )
        raise ValueError(f"Could not read a checkpoint from {path}: {e}. {advice}") from None
    except Exception as e:  # Orbax/TensorStore errors on a foreign checkpoint
        raise ValueError(f"Could not read a checkpoint from {path}: {e}") from e


def default_out(workdir: str, spec: sampler_spec.SamplerSpec) -> str:
    """``<workdir>/samples_<spec.name()>``: one directory per setting, since a directory holds the
    chunks of one setting only."""
    return os.path.join(workdir, f"samples_{spec.name()}")


# ----------------------------------------------------------------------------------------------
# The sampler.
# ----------------------------------------------------------------------------------------------
def make_generate_fn(
    model: Any,
    config: ml_collections.ConfigDict,
    mesh: Mesh,
    spec: sampler_spec.SamplerSpec,
    *,
    batch_size: int,
    return_trajectory: bool = False,
) -> Callable[..., tuple[jax.Array, ...]]:
    """Jitted ``(params, key, chunk) -> (uint8 images [B, H, W, C], labels [B] int32)`` drawn
    as ``spec`` says with key fold_in(key, chunk); the batch is split over ``mesh``'s 'data' axis.

    A batch B that the devices do not divide is drawn as the next multiple of the device count
    and the padding rows are dropped (the outputs are then replicated rather than split). Noise
    and labels are drawn per row from the same keys (threefry, partitionable: row i's values do
    not depend on the batch size), so the B images are those an unpadded run of batch B draws,
    e.g. on a device count that divides B.

    The one builder of sampled images: the sample and evaluate programs, and the trainer's grids
    and evaluations. Class-conditional labels (``spec.labels``) are ``"random"`` (uniform),
    ``"grid"`` (i mod K: column k of a K-column grid shows class k), a tuple of classes (i-th
    sample: labels[i mod n]) or ``"none"`` (the "no class" label K of a model trained with label
    dropout: unconditional samples); zeros for an unconditional model. ``spec.guidance`` w is
    classifier-free guidance, at the timesteps of ``spec.guidance_interval`` only if given
    (``sampling.make_model_fn``). With ``return_trajectory`` it also returns uint8 frames
    [F, 8, H, W, C] of x_t and pred_x0.
    """
    spec.check_against(config)
    num_classes, labels = config.model.get("num_classes"), spec.labels
    padded = parallel.padded_batch_size(batch_size, mesh.size)
    size, channels = config.data.image_size, config.data.num_channels
    shape = (padded, size, size, channels)
    sched = diffusion.schedule_from_config(config.diffusion)
    batch_sharding = NamedSharding(mesh, P("data"))
    replicated = NamedSharding(mesh, P())

    def generate(params: PyTree, key: jax.Array, chunk: jax.Array) -> tuple[jax.Array, ...]:
        label_key, sample_key = jax.random.split(jax.random.fold_in(key, chunk))
        index = jnp.arange(padded, dtype=jnp.int32)
        if not num_classes:
            y = jnp.zeros((padded,), jnp.int32)
        elif labels == "grid":
            y = index % num_classes
        elif labels == "none":
            y = jnp.full((padded,), num_classes, jnp.int32)
        elif labels == "random":
            y = jax.random.randint(label_key, (padded,), 0, num_classes, jnp.int32)
        else:
            y = jnp.asarray(labels, jnp.int32)[index % len(labels)]
        network = sampling.make_model_fn(model, params, y if num_classes else None,
                                         spec.guidance, spec.guidance_interval)

        def model_fn(x: jax.Array, t: jax.Array) -> jax.Array:  # keep the chain's batch split
            return network(jax.lax.with_sharding_constraint(x, batch_sharding), t)

        result = sampling.sample(
            model_fn, sched, sample_key, shape, **spec.chain_kwargs(),
            mean_type=config.diffusion.mean_type, return_trajectory=return_trajectory,
        )
        if not return_trajectory:
            return images.to_uint8(result)[:batch_size], y[:batch_size]
        x, traj = result
        rows = min(TRAJECTORY_ROWS, batch_size)
        film = (images.to_uint8(f[:, :rows]) for f in (traj.x_t, traj.pred_x0))
        return (images.to_uint8(x)[:batch_size], y[:batch_size], *film)

    out_shardings = (batch_sharding if padded == batch_size else replicated,) * 2
    if return_trajectory:
        out_shardings += (replicated,) * 2
    return jax.jit(generate, out_shardings=out_shardings)


# ----------------------------------------------------------------------------------------------
# Files.
# ----------------------------------------------------------------------------------------------
def _check_settings(out: Path, spec: sampler_spec.SamplerSpec, settings: dict[str, Any]) -> None:
    """Record the settings the chunks are drawn with (``spec``'s JSON form and the run's
    ``settings``); refuse to mix chunks of other settings. A setting missing from an older
    ``sampling.json`` counts as its default (None for the run's), so the directories of earlier
    versions stay resumable. Process 0 decides (``out`` may be on its disk only) and every
    process raises with it."""
    settings = {**spec.to_json(), **settings}

    def check_or_record() -> None:
        path = out / SETTINGS_FILE
        if path.exists():
            saved = json.loads(path.read_text())
            saved.update(sampler_spec.SamplerSpec.from_json(saved, spec.num_timesteps).to_json())
            diffs = [f"{k}: {saved.get(k)!r} on disk != {settings.get(k)!r} now"
                     for k in sorted(set(saved) | set(settings))
                     if saved.get(k) != settings.get(k)]
            if diffs:
                raise ValueError(
                    f"{out} holds samples drawn with other settings ({'; '.join(diffs)}). "
                    "Pass another --out, or delete that directory to start over."
                )
        else:
            out.mkdir(parents=True, exist_ok=True)
            text = json.dumps(settings, indent=2, sort_keys=True) + "\n"
            files.write_atomic(path, lambda f: f.write(text.encode()))

    parallel.on_process_0(check_or_record, f"Checking the sample settings in {out}")


def _missing_chunks(out: Path, num_chunks: int) -> list[int]:
    """Chunks not yet on disk, as process 0 sees them (all processes must agree)."""
    missing = np.array([not chunk_path(out, c).exists() for c in range(num_chunks)])
    if jax.process_count() > 1:
        missing = multihost_utils.broadcast_one_to_all(missing)
    return [int(c) for c in np.flatnonzero(missing)]


def _load_chunk(out: Path, chunk: int, key: str = "arr_0") -> np.ndarray:
    return input_files.open_samples(chunk_path(out, chunk), "sample chunk").load(key)


def _merge(out: Path, num_chunks: int, num_samples: int, conditional: bool) -> None:
    """Stream the chunks into samples.npz ("arr_0" uint8 [num_samples, H, W, C], + "labels"),
    holding one chunk in memory at a time."""

    def write(f: Any) -> None:
        labels = []
        with zipfile.ZipFile(f, "w", allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as member:
                left = num_samples
                for c in range(num_chunks):
                    x = _load_chunk(out, c)[:left]
                    if c == 0:
                        header = {"descr": "|u1", "fortran_order": False,
                                  "shape": (num_samples, *x.shape[1:])}
                        np.lib.format.write_array_header_1_0(member, header)
                    member.write(np.ascontiguousarray(x).tobytes())
                    if conditional:
                        labels.append(_load_chunk(out, c, "labels")[:left])
                    left -= len(x)
            if conditional:
                with zf.open("labels.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.concatenate(labels))

    files.write_atomic(out / MERGED_FILE, write)


# ----------------------------------------------------------------------------------------------
# The program.
# ----------------------------------------------------------------------------------------------
def generate_samples(
    params: PyTree,
    config: ml_collections.ConfigDict,
    out: str | os.PathLike,
    spec: sampler_spec.SamplerSpec,
    *,
    num_samples: int,
    batch_size: int,
    seed: int,
    trajectory: bool = False,
    checkpoint_step: int | None = None,
) -> Path:
    """Draw ``num_samples`` images from ``params`` into ``out`` (see the module docstring) as
    ``spec`` says (``make_generate_fn``), skipping chunks already there. Returns the path of
    samples.npz (with "labels" unless the samples are unconditional)."""
    if num_samples <= 0:
        raise ValueError(f"num_samples must be positive, got {num_samples}.")
    out = Path(out)
    mesh = parallel.make_data_mesh()
    padded = parallel.padded_batch_size(batch_size, mesh.size, "--batch_size")
    if padded != batch_size:  # the same images as an unpadded run: see make_generate_fn
        multiples = " or ".join(str(b) for b in (padded - mesh.size, padded) if b)
        logging.warning(
            "--batch_size=%d is not a multiple of the %d devices: each batch is drawn as %d "
            "images and the %d padding ones are dropped (%.0f%% more work); --batch_size=%s "
            "avoids that.", batch_size, mesh.size, padded, padded - batch_size,
            100 * (padded / batch_size - 1), multiples)
    model = unet_from_config(config.model, config.data.num_channels)
    generate = make_generate_fn(model, config, mesh, spec, batch_size=batch_size)
    conditional = bool(config.model.get("num_classes")) and spec.labels != "none"
    _check_settings(out, spec, dict(
        batch_size=batch_size, seed=seed, checkpoint_step=checkpoint_step, image_shape=[
            config.data.image_size, config.data.image_size, config.data.num_channels],
        num_classes=config.model.get("num_classes"), mean_type=config.diffusion.mean_type,
        key_stream="sample-v2",  # chunks drawn before keys.SAMPLE existed are not mixed in
    ))

    params = jax.device_put(params, NamedSharding(mesh, P()))
    root_key = keys.stream(seed, keys.SAMPLE)
    num_chunks = math.ceil(num_samples / batch_size)
    missing = _missing_chunks(out, num_chunks)
    is_writer = jax.process_index() == 0
    done = sum(min(batch_size, num_samples - c * batch_size)
               for c in set(range(num_chunks)) - set(missing))
    logging.info("Sampling %d images into %s (%d of %d chunks to draw) on %d devices.",
                 num_samples, out, len(missing), num_chunks, mesh.size)
    with tqdm(total=num_samples, initial=done, unit="img", disable=not is_writer) as bar:
        for c in missing:
            x, labels = multihost_utils.process_allgather(
                generate(params, root_key, np.int32(c)), tiled=True
            )
            if is_writer:
                arrays = dict(arr_0=x, labels=labels) if conditional else dict(arr_0=x)
                files.write_atomic(chunk_path(out, c), lambda f, a=arrays: np.savez(f, **a))
            bar.update(min(batch_size, num_samples - c * batch_size))

    if trajectory:
        traj_fn = make_generate_fn(model, config, mesh, spec, batch_size=batch_size,
                                   return_trajectory=True)
        x, _, x_t, pred_x0 = multihost_utils.process_allgather(
            traj_fn(params, root_key, np.int32(0)), tiled=True
        )
        if is_writer:  # each strip ends with the final samples, the first ones of samples.npz
            for name, frames in (("x_t", x_t), ("pred_x0", pred_x0)):
                film = np.concatenate([frames, x[None, :TRAJECTORY_ROWS]])
                images.write_trajectory(out / f"trajectory_{name}.png", film)
    if is_writer:
        _merge(out, num_chunks, num_samples, conditional)
        first = [_load_chunk(out, c)
                 for c in range(min(num_chunks, math.ceil(GRID_IMAGES / batch_size)))]
        images.write_grid(out / "grid.png", np.concatenate(first)[: min(GRID_IMAGES, num_samples)])
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("ddpm_jax.sample done")
    return out / MERGED_FILE


