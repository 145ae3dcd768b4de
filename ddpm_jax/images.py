"""Small image utilities: model space [-1, 1] -> uint8, image grids and trajectory strips as PNG."""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from PIL import Image


def to_uint8(x: jax.Array | np.ndarray) -> jax.Array:
    """[-1, 1] -> {0, ..., 255}: round((x + 1) · 127.5), clipped; the inverse of the data's
    u / 127.5 - 1, so 8-bit data round-trip exactly. Jittable."""
    return jnp.clip(jnp.round((jnp.asarray(x, jnp.float32) + 1.0) * 127.5), 0, 255).astype(
        jnp.uint8
    )


def _as_uint8(images: jax.Array | np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"Images must be uint8 or float in [-1, 1], got dtype {images.dtype}.")
    return np.asarray(to_uint8(images))


def make_grid(
    images: jax.Array | np.ndarray, ncols: int | None = None, padding: int = 2, pad_value: int = 0
) -> np.ndarray:
    """Tile [N, H, W, C] images (uint8, or float in [-1, 1]) row by row into one uint8
    [rows·(H+p)+p, ncols·(W+p)+p, C] image; ``ncols`` defaults to ceil(sqrt(N))."""
    images = _as_uint8(images)
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"Expected a non-empty [N, H, W, C] batch of images, got {images.shape}.")
    n, h, w, c = images.shape
    ncols = min(n, ncols or math.ceil(math.sqrt(n)))
    nrows = math.ceil(n / ncols)
    grid = np.full(
        (nrows * (h + padding) + padding, ncols * (w + padding) + padding, c), pad_value, np.uint8
    )
    for k, image in enumerate(images):
        top, left = padding + (k // ncols) * (h + padding), padding + (k % ncols) * (w + padding)
        grid[top : top + h, left : left + w] = image
    return grid


def write_png(path: str | os.PathLike, image: np.ndarray) -> None:
    """Write one uint8 [H, W, C] image, C = 1 (grayscale) or 3 (RGB), as PNG."""
    if image.ndim != 3 or image.shape[-1] not in (1, 3):
        raise ValueError(f"Expected a [H, W, 1 or 3] image, got shape {image.shape}.")
    path = epath.Path(path)  # a local path or a cloud one (gs://...)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(f, format="PNG")


def write_grid(
    path: str | os.PathLike,
    images: jax.Array | np.ndarray,
    ncols: int | None = None,
    padding: int = 2,
) -> None:
    """Write [N, H, W, C] images (uint8, or float in [-1, 1]) as one PNG grid."""
    write_png(path, make_grid(images, ncols, padding))


def write_trajectory(
    path: str | os.PathLike, frames: jax.Array | np.ndarray, max_rows: int = 8, padding: int = 2
) -> None:
    """Write a denoising film [F, B, H, W, C] as a PNG strip: one row per sample (at most
    ``max_rows``), its F frames left to right."""
    frames = np.asarray(frames)
    if frames.ndim != 5:
        raise ValueError(f"Expected frames of shape [F, B, H, W, C], got {frames.shape}.")
    rows = frames[:, :max_rows].swapaxes(0, 1)  # [B, F, H, W, C]
    write_grid(path, rows.reshape(-1, *rows.shape[2:]), ncols=frames.shape[0], padding=padding)
