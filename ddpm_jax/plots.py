"""`python -m ddpm_jax.plots --out docs/`: the pictures that check a diffusion by eye.

Every value drawn comes from the library's own functions, never from a formula typed again here:

    schedules.png          √ᾱ_t, √(1 - ᾱ_t) and log SNR = log(ᾱ_t / (1 - ᾱ_t)) over t for every
                           named schedule (``diffusion.make_schedule``'s tables)
    time_embedding.png     ``timestep_embedding`` of t = 0..50 in both layouts: the first
                           dimensions as curves, all of them as a heat map
    forward_process.png    ``q_sample`` of one real mnist5k digit at 10 timesteps, one noise draw
                           for every cell, one row per schedule (linear and cosine by default)
    loss_by_t_quarter.png  with ``--workdir``: a training run's loss per quarter of the t range
                           (its TensorBoard scalars ``loss_t_q0..3``)

Each figure's data is a function returning arrays (``schedule_curves``, ``embedding_table``,
``forward_strip``, ``loss_by_t_quarter``); the ``draw_*`` functions only draw it. Drawing needs
matplotlib, an optional extra (``pip install "ddpm_jax[plots]"``), imported only when drawing.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from ddpm_jax import diffusion, images
from ddpm_jax.models import timestep_embedding
from ddpm_jax.models.unet import EMBEDDING_LAYOUTS

INSTALL_HINT = 'the figures need matplotlib, an optional extra: pip install "ddpm_jax[plots]"'
NUM_T_QUARTERS = 4  # the trainer's loss_t_q0..3
_DPI = 100


# ----------------------------------------------------------------------------------------------
# The data of each figure.
# ----------------------------------------------------------------------------------------------
def schedule_curves(
    num_timesteps: int = 1000, names: Sequence[str] = diffusion.SCHEDULES
) -> dict[str, dict[str, np.ndarray]]:
    """Per schedule name, [T] arrays from ``make_schedule(name, num_timesteps)``: its float32
    tables ``sqrt_alphas_cumprod`` and ``sqrt_one_minus_alphas_cumprod``, and ``log_snr`` =
    log(alphas_cumprod) - log_one_minus_alphas_cumprod (float64; -inf where ᾱ_t = 0, as at the
    last step of "jsd")."""
    curves = {}
    for name in names:
        sched = diffusion.make_schedule(name, num_timesteps)
        alphas_cumprod = np.asarray(sched.alphas_cumprod, np.float64)
        with np.errstate(divide="ignore"):
            log_snr = np.log(alphas_cumprod) - np.asarray(sched.log_one_minus_alphas_cumprod)
        curves[name] = {
            "sqrt_alphas_cumprod": np.asarray(sched.sqrt_alphas_cumprod),
            "sqrt_one_minus_alphas_cumprod": np.asarray(sched.sqrt_one_minus_alphas_cumprod),
            "log_snr": log_snr,
        }
    return curves


def embedding_table(dim: int = 128, layout: str = "concat", num_t: int = 51) -> np.ndarray:
    """``timestep_embedding`` of t = 0..num_t-1 in ``layout``: float32 [num_t, dim]."""
    return np.asarray(timestep_embedding(jnp.arange(num_t, dtype=jnp.int32), dim, layout=layout))


def mnist5k_digit(index: int = 0, data_dir: str | None = None) -> np.ndarray:
    """Digit ``index`` of mnist5k (built offline on first use) as the model sees it: float32
    [28, 28, 1] in [-1, 1]."""
    import tensorflow_datasets as tfds

    import ddpm_jax.datasets  # noqa: F401  (registers mnist5k with TFDS)

    if not 0 <= index < 5000:
        raise ValueError(f"mnist5k has digits 0..4999, got index {index}.")
    batch = tfds.as_numpy(
        tfds.load("mnist5k", split=f"train[{index}:{index + 1}]", batch_size=-1, data_dir=data_dir)
    )
    return batch["image"][0].astype(np.float32) / 127.5 - 1.0


def strip_timesteps(num_timesteps: int, count: int = 10) -> np.ndarray:
    """``count`` evenly spaced timestep indices from 0 to T-1, int32."""
    return np.linspace(0, num_timesteps - 1, count).round().astype(np.int32)


def forward_frames(
    x0: np.ndarray,
    noise: np.ndarray,
    timesteps: np.ndarray,
    names: Sequence[str],
    num_timesteps: int = 1000,
) -> np.ndarray:
    """x_t = ``q_sample(make_schedule(name, T), x0, t, noise)`` for each schedule name and each t,
    with the same ``noise`` everywhere: float32 [len(names), len(timesteps), H, W, C]."""
    if x0.shape != noise.shape or x0.ndim != 3:
        raise ValueError(
            f"x0 and noise must each be one [H, W, C] image, got {x0.shape} and {noise.shape}."
        )
    t = jnp.asarray(timesteps, jnp.int32)
    batch = (t.shape[0],) + x0.shape
    x0s, noises = jnp.broadcast_to(x0, batch), jnp.broadcast_to(noise, batch)
    scheds = [diffusion.make_schedule(name, num_timesteps) for name in names]
    return np.stack([np.asarray(diffusion.q_sample(s, x0s, t, noises)) for s in scheds])


def forward_strip(
    x0: np.ndarray,
    noise: np.ndarray,
    timesteps: np.ndarray,
    names: Sequence[str],
    num_timesteps: int = 1000,
    padding: int = 2,
) -> np.ndarray:
    """The forward process as one uint8 [H', W', C] image: a row per schedule, x_0 and then
    ``forward_frames`` left to right, separated by white ``padding``."""
    frames = forward_frames(x0, noise, timesteps, names, num_timesteps)
    rows = np.concatenate([np.broadcast_to(x0, (len(names), 1) + x0.shape), frames], axis=1)
    return images.make_grid(
        rows.reshape((-1,) + x0.shape), ncols=rows.shape[1], padding=padding, pad_value=255
    )


def loss_by_t_quarter(workdir: str | os.PathLike) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The trainer's scalars ``loss_t_q0..3`` from the event files in ``workdir``: tag ->
    (steps int64 [N], values float64 [N]) sorted by step. A step logged twice (a resumed run)
    keeps the value of the newest event file."""
    import tensorflow as tf  # already a dependency of the input pipeline

    files = sorted(tf.io.gfile.glob(os.path.join(os.fspath(workdir), "events.out.tfevents.*")))
    if not files:
        raise FileNotFoundError(f"No TensorBoard event files (events.out.tfevents.*) in {workdir}.")
    tags = [f"loss_t_q{q}" for q in range(NUM_T_QUARTERS)]
    points: dict[str, dict[int, float]] = {tag: {} for tag in tags}
    for path in files:  # named by creation time, so a resumed run's file comes later
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.tag in points:
                    scalar = tf.make_ndarray(value.tensor) if value.HasField("tensor") else (
                        value.simple_value
                    )
                    points[value.tag][event.step] = float(scalar)
    if not any(points.values()):
        raise ValueError(f"The event files in {workdir} hold none of the scalars {tags}.")
    return {
        tag: (np.array(sorted(p), np.int64), np.array([p[s] for s in sorted(p)], np.float64))
        for tag, p in points.items()
    }


# ----------------------------------------------------------------------------------------------
# Drawing: matplotlib's object API (no pyplot, no global backend), rendered by Agg.
# ----------------------------------------------------------------------------------------------
def _figure_class() -> type:
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e
    return Figure


def _figure(width: float, height: float) -> Any:
    return _figure_class()(figsize=(width, height), dpi=_DPI)


def _save(fig: Any, path: str | os.PathLike) -> None:
    """Render with Agg and write a 256-colour PNG (a third of the size of matplotlib's RGBA)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from PIL import Image

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    rgb = Image.fromarray(np.asarray(canvas.buffer_rgba())).convert("RGB")
    path = epath.Path(path)  # a local path or a cloud one (gs://...)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        rgb.quantize(256, method=Image.Quantize.MEDIANCUT).save(f, format="PNG", optimize=True)


def draw_schedules(curves: dict[str, dict[str, np.ndarray]], path: str | os.PathLike) -> None:
    """Three panels over t: √ᾱ_t, √(1 - ᾱ_t) and log SNR, one line per schedule."""
    fig = _figure(13, 4.2)
    axes = fig.subplots(1, 3)
    panels = [
        ("sqrt_alphas_cumprod", "√ᾱ_t  (signal)"),
        ("sqrt_one_minus_alphas_cumprod", "√(1 − ᾱ_t)  (noise)"),
        ("log_snr", "log SNR = log(ᾱ_t / (1 − ᾱ_t))"),
    ]
    for ax, (key, title) in zip(axes, panels, strict=True):
        for name, curve in curves.items():
            ax.plot(np.arange(curve[key].size), curve[key], label=name, linewidth=1.5)
        ax.set_title(title)
        ax.set_xlabel("t (index 0..T−1)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("coefficient of x₀ in x_t")
    axes[1].set_ylabel("coefficient of ε in x_t")
    axes[2].set_ylabel("nats")
    axes[0].legend(title="schedule", fontsize=8)
    fig.suptitle("q(x_t | x₀) = N(√ᾱ_t x₀, (1 − ᾱ_t) I) for every named schedule")
    fig.tight_layout()
    _save(fig, path)


def draw_time_embedding(
    tables: dict[str, np.ndarray], path: str | os.PathLike, num_curves: int = 4
) -> None:
    """A row per layout: its first ``num_curves`` dimensions over t, and the whole [t, dim]
    table as a heat map."""
    fig = _figure(12, 3.6 * len(tables))
    axes = fig.subplots(len(tables), 2, squeeze=False, gridspec_kw={"width_ratios": [1, 1.3]})
    for (curves_ax, heat_ax), (layout, table) in zip(axes, tables.items(), strict=True):
        t = np.arange(table.shape[0])
        for d in range(min(num_curves, table.shape[1])):
            curves_ax.plot(t, table[:, d], marker=".", markersize=4, linewidth=1, label=f"dim {d}")
        curves_ax.set_title(f'layout="{layout}": the first {num_curves} dimensions')
        curves_ax.set_xlabel("t")
        curves_ax.set_ylabel("embedding value")
        curves_ax.legend(fontsize=8, loc="lower left", ncols=num_curves)
        curves_ax.set_ylim(-1.35, 1.1)
        curves_ax.grid(alpha=0.3)
        image = heat_ax.imshow(
            table, aspect="auto", cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest",
            origin="lower",
        )
        heat_ax.set_title(f'layout="{layout}": all {table.shape[1]} dimensions')
        heat_ax.set_xlabel("dimension")
        heat_ax.set_ylabel("t")
        fig.colorbar(image, ax=heat_ax)
    num_t, dim = next(iter(tables.values())).shape
    fig.suptitle(f"timestep_embedding(t, {dim}) for t = 0..{num_t - 1}")
    fig.tight_layout()
    _save(fig, path)


def draw_forward_process(
    strip: np.ndarray,
    names: Sequence[str],
    timesteps: np.ndarray,
    path: str | os.PathLike,
    title: str,
    scale: int = 3,
) -> None:
    """``forward_strip``'s image, each pixel ``scale`` × ``scale`` screen pixels, with the
    schedules and timesteps as tick labels."""
    rows, cols = len(names), len(timesteps) + 1
    height, width = strip.shape[:2]
    left, right, top, bottom = 0.8, 0.15, 0.55, 0.5  # margins, inches
    image_w, image_h = width * scale / _DPI, height * scale / _DPI
    fig = _figure(image_w + left + right, image_h + top + bottom)
    ax = fig.add_axes(
        (left / fig.get_figwidth(), bottom / fig.get_figheight(),
         image_w / fig.get_figwidth(), image_h / fig.get_figheight())
    )
    ax.imshow(strip[..., 0] if strip.shape[-1] == 1 else strip, cmap="gray", vmin=0, vmax=255,
              interpolation="nearest")
    ax.set_xticks((np.arange(cols) + 0.5) * width / cols, ["x₀"] + [str(t) for t in timesteps])
    ax.set_yticks((np.arange(rows) + 0.5) * height / rows, list(names))
    ax.tick_params(length=0)
    ax.set_xlabel("t (index 0..T−1)")
    ax.set_title(title, fontsize=10)
    _save(fig, path)


def _label_2_3_5(value: float, _: int) -> str:
    """A log axis's minor tick label at 2, 3 and 5 times a power of ten, else none."""
    mantissa = value / 10 ** math.floor(math.log10(value))
    return f"{value:g}" if round(mantissa) in (2, 3, 5) else ""


def draw_loss_by_t_quarter(
    losses: dict[str, tuple[np.ndarray, np.ndarray]], path: str | os.PathLike, title: str
) -> None:
    """The training loss of each quarter of the t range over the steps, log scale."""
    fig = _figure(7, 4.2)
    from matplotlib.ticker import FuncFormatter  # after _figure's check that matplotlib is there

    ax = fig.subplots()
    labels = ["t < T/4  (least noise)", "T/4 ≤ t < T/2", "T/2 ≤ t < 3T/4", "3T/4 ≤ t  (most noise)"]
    for q, label in enumerate(labels):
        steps, values = losses[f"loss_t_q{q}"]
        ax.plot(steps, values, marker=".", markersize=4, linewidth=1.2, label=f"q{q}: {label}")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(_label_2_3_5))
    ax.set_xlabel("training step")
    ax.set_ylabel("L_simple (mean over the interval)")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


# ----------------------------------------------------------------------------------------------
# The command.
# ----------------------------------------------------------------------------------------------
def write_plots(
    out: str | os.PathLike,
    *,
    workdir: str | os.PathLike | None = None,
    num_timesteps: int = 1000,
    strip_schedules: Sequence[str] = ("linear", "cosine"),
    embedding_dim: int = 128,
    digit: int = 0,
    seed: int = 0,
    data_dir: str | None = None,
) -> list[epath.Path]:
    """Draw every figure into the folder ``out`` (the loss one only with ``workdir``); returns
    the paths written. All data is made before anything is drawn, so bad input writes nothing."""
    _figure_class()  # fail at once without matplotlib
    if not strip_schedules:
        raise ValueError("strip_schedules names no schedule.")
    curves = schedule_curves(num_timesteps)
    tables = {layout: embedding_table(embedding_dim, layout) for layout in EMBEDDING_LAYOUTS}
    x0 = mnist5k_digit(digit, data_dir)
    noise = np.asarray(jax.random.normal(jax.random.key(seed), x0.shape, jnp.float32))
    timesteps = strip_timesteps(num_timesteps)
    strip = forward_strip(x0, noise, timesteps, strip_schedules, num_timesteps)
    losses = None if workdir is None else loss_by_t_quarter(workdir)

    out = epath.Path(out)
    paths = [out / "schedules.png", out / "time_embedding.png", out / "forward_process.png"]
    draw_schedules(curves, paths[0])
    draw_time_embedding(tables, paths[1])
    draw_forward_process(
        strip, strip_schedules, timesteps, paths[2],
        title=f"x_t = q_sample(schedule, x₀, t, ε): the mnist5k digit at index {digit}, one ε",
    )
    if losses is not None:
        paths.append(out / "loss_by_t_quarter.png")
        title = f"loss per quarter of t: {epath.Path(workdir).name}"
        draw_loss_by_t_quarter(losses, paths[3], title)
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m ddpm_jax.plots", description=__doc__.split("\n\n")[0].strip("`")
    )
    parser.add_argument("--out", required=True, help="folder for the PNG files (created)")
    parser.add_argument("--workdir", help="a training workdir: also plot its loss per quarter of t")
    parser.add_argument("--num_timesteps", type=int, default=1000, help="T of every schedule")
    parser.add_argument("--strip_schedules", default="linear,cosine",
                        help="comma-separated schedules of forward_process.png, a row each")
    parser.add_argument("--embedding_dim", type=int, default=128, help="dim of the time embedding")
    parser.add_argument("--digit", type=int, default=0, help="index of the mnist5k digit to noise")
    parser.add_argument("--seed", type=int, default=0, help="seed of the forward process's noise")
    parser.add_argument("--data_dir", help="TFDS data_dir for mnist5k (default: TFDS's)")
    args = parser.parse_args(argv)
    try:
        paths = write_plots(
            args.out, workdir=args.workdir, num_timesteps=args.num_timesteps,
            strip_schedules=[s for s in args.strip_schedules.split(",") if s],
            embedding_dim=args.embedding_dim, digit=args.digit, seed=args.seed,
            data_dir=args.data_dir,
        )
    except (ValueError, OSError, ImportError) as e:  # the user's input: a message, no traceback
        parser.exit(1, f"{parser.prog}: error: {e}\n")
    for path in paths:
        print(f"Wrote {path} ({math.ceil(path.stat().length / 1024)} KB)")


if __name__ == "__main__":
    main()
