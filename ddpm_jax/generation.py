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
# Checkpoint and sampler settings.
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


def sampler_settings(
    config: ml_collections.ConfigDict,
    sampler: str | None = None,
    num_steps: int | None = None,
    eta: float | None = None,
) -> tuple[str, int | None, float]:
    """(sampler, num_steps or None for all T, eta): the given values, else the config's sample
    section; the config's eta belongs to its DDIM sampler only."""
    sampler = sampler or config.sample.sampler
    num_steps = num_steps if num_steps is not None else config.sample.get("num_steps")
    if num_steps == config.diffusion.num_timesteps:
        num_steps = None  # all steps: the chain needs no respacing
    if eta is None:
        eta = config.sample.get("eta", 0.0) if sampler == "ddim" else 0.0
    return sampler, num_steps, eta


ALL_STEPS = "all"  # the guidance interval of every step, to override a config's interval


def guidance_setting(
    config: ml_collections.ConfigDict,
    guidance: float | None = None,
    interval: tuple[int, int] | str | None = None,
) -> tuple[float, tuple[int, int] | None]:
    """(w, interval): the classifier-free guidance scale and the timesteps (t_min, t_max) it is
    limited to (None: every step): the given ones, else the config's sample.guidance and
    sample.guidance_interval. ``interval`` may be text, as ``--guidance_interval`` takes it:
    "t_min,t_max", or "all" for every step whatever the config says. Unguided sampling (w = 0)
    has no interval. A bad interval is a ValueError."""
    w = float(guidance if guidance is not None else config.sample.get("guidance", 0.0))
    if interval is None:
        interval = config.sample.get("guidance_interval")
    if interval == ALL_STEPS or not w:
        return w, None
    if isinstance(interval, str):
        try:
            interval = tuple(int(t) for t in interval.split(","))
        except ValueError:
            pass  # check_guidance_interval names the problem
    sampling.check_guidance_interval(interval, config.diffusion.num_timesteps)
    return w, None if interval is None else tuple(interval)


def guidance_name(guidance: float, interval: tuple[int, int] | None = None) -> str:
    """``w<guidance>[_t<t_min>-<t_max>]`` ("" without guidance): names files and figures."""
    if not guidance:
        return ""
    return f"w{guidance:g}" + (f"_t{interval[0]}-{interval[1]}" if interval else "")


def default_out(workdir: str, sampler: str, steps: int, guidance: float = 0.0,
                labels: Labels = "random", guidance_interval: tuple[int, int] | None = None) -> str:
    """``<workdir>/samples_<sampler>_<steps>[_w<guidance>[_t<t_min>-<t_max>]][_<labels>]``: one
    directory per setting, since a directory holds the chunks of one setting only."""
    name = f"samples_{sampler}_{steps}"
    if guidance:
        name += "_" + guidance_name(guidance, guidance_interval)
    if labels != "random":
        name += "_" + (labels if isinstance(labels, str) else "y" + "-".join(map(str, labels)))
    return os.path.join(workdir, name)


# ----------------------------------------------------------------------------------------------
# The sampler.
# ----------------------------------------------------------------------------------------------
LABELS = ("random", "grid", "none")
Labels = str | tuple[int, ...]


def check_labels(labels: Labels, num_classes: int | None, guidance: float, p_uncond: float) -> None:
    """Raise ValueError for a ``labels``/``guidance`` pair ``make_generate_fn`` would reject."""
    if isinstance(labels, str):
        if labels not in LABELS:
            raise ValueError(f"labels={labels!r}: use one of {LABELS} or a tuple of classes.")
    elif not labels or any(not 0 <= k < (num_classes or 0) for k in labels):
        raise ValueError(
            f"labels={labels}: a tuple of classes needs a class-conditional model and classes in "
            f"0..{(num_classes or 0) - 1}, got num_classes={num_classes}."
        )
    if labels == "none" and num_classes and not p_uncond:
        raise ValueError(
            "labels='none' (unconditional samples) needs a model trained with label dropout "
            "(config.model.p_uncond > 0); this one has no 'no class' embedding."
        )
    if guidance and (labels == "none" or not num_classes):
        raise ValueError(
            f"guidance={guidance} needs class labels: with labels='none' or an unconditional "
            "model there is nothing to guide towards. Use guidance=0."
        )
    sampling.check_guidance(guidance, bool(num_classes) and p_uncond > 0)


def make_generate_fn(
    model: Any,
    config: ml_collections.ConfigDict,
    mesh: Mesh,
    *,
    batch_size: int,
    sampler: str,
    num_steps: int | None,
    eta: float,
    labels: Labels = "random",
    guidance: float = 0.0,
    guidance_interval: tuple[int, int] | None = None,
    return_trajectory: bool = False,
) -> Callable[..., tuple[jax.Array, ...]]:
    """Jitted ``(params, key, chunk) -> (uint8 images [B, H, W, C], labels [B] int32)`` drawn
    with key fold_in(key, chunk); the batch is split over ``mesh``'s 'data' axis.

    A batch B that the devices do not divide is drawn as the next multiple of the device count
    and the padding rows are dropped (the outputs are then replicated rather than split). Noise
    and labels are drawn per row from the same keys (threefry, partitionable: row i's values do
    not depend on the batch size), so the B images are those an unpadded run of batch B draws,
    e.g. on a device count that divides B.

    The one builder of sampled images: the sample and evaluate programs, and the trainer's grids
    and evaluations. Class-conditional labels are ``"random"`` (uniform), ``"grid"`` (i mod K:
    column k of a K-column grid shows class k), a tuple of classes (i-th sample: labels[i mod n])
    or ``"none"`` (the "no class" label K of a model trained with label dropout: unconditional
    samples); zeros for an unconditional model. ``guidance`` w is classifier-free guidance, at the
    timesteps of ``guidance_interval`` only if given (``sampling.make_model_fn``). With
    ``return_trajectory`` it also returns uint8 frames [F, 8, H, W, C] of x_t and pred_x0.
    """
    num_classes = config.model.get("num_classes")
    check_labels(labels, num_classes, guidance, config.model.get("p_uncond", 0.0))
    sampling.check_guidance_interval(guidance_interval, config.diffusion.num_timesteps)
    sampling.check_sampler_args(
        config.diffusion.num_timesteps, sampler=sampler, num_steps=num_steps, eta=eta,
        var_type=config.diffusion.var_type,
    )
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
        network = sampling.make_model_fn(model, params, y if num_classes else None, guidance,
                                         guidance_interval)

        def model_fn(x: jax.Array, t: jax.Array) -> jax.Array:  # keep the chain's batch split
            return network(jax.lax.with_sharding_constraint(x, batch_sharding), t)

        result = sampling.sample(
            model_fn, sched, sample_key, shape,
            sampler=sampler, num_steps=num_steps, eta=eta,
            var_type=config.diffusion.var_type, mean_type=config.diffusion.mean_type,
            clip_denoised=config.sample.clip_denoised,
            return_trajectory=return_trajectory,
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
def _check_settings(out: Path, settings: dict[str, Any]) -> None:
    """Record the settings the chunks are drawn with; refuse to mix chunks of other settings.
    A setting missing from an older ``sampling.json`` counts as None (its default), so the
    directories of earlier versions stay resumable. Process 0 decides (``out`` may be on its disk
    only) and every process raises with it."""

    def check_or_record() -> None:
        path = out / SETTINGS_FILE
        if path.exists():
            saved = json.loads(path.read_text())
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
    *,
    num_samples: int,
    batch_size: int,
    sampler: str,
    num_steps: int | None,
    eta: float,
    seed: int,
    labels: Labels = "random",
    guidance: float = 0.0,
    guidance_interval: tuple[int, int] | None = None,
    trajectory: bool = False,
    checkpoint_step: int | None = None,
) -> Path:
    """Draw ``num_samples`` images from ``params`` into ``out`` (see the module docstring), skipping
    chunks already there; ``labels`` and the guidance as in ``make_generate_fn``. Returns the path
    of samples.npz (with "labels" unless the samples are unconditional)."""
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
    kw = dict(batch_size=batch_size, sampler=sampler, num_steps=num_steps, eta=eta,
              labels=labels, guidance=guidance, guidance_interval=guidance_interval)
    generate = make_generate_fn(model, config, mesh, **kw)
    conditional = bool(config.model.get("num_classes")) and labels != "none"
    _check_settings(out, dict(
        kw, labels=labels if isinstance(labels, str) else list(labels), seed=seed,
        guidance_interval=list(guidance_interval) if guidance_interval else None,
        checkpoint_step=checkpoint_step, image_shape=[
            config.data.image_size, config.data.image_size, config.data.num_channels],
        num_classes=config.model.get("num_classes"), clip_denoised=config.sample.clip_denoised,
        var_type=config.diffusion.var_type, mean_type=config.diffusion.mean_type,
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
        traj_fn = make_generate_fn(model, config, mesh, return_trajectory=True, **kw)
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


