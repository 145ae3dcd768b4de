"""Batched, sharded feature extraction: a network of uint8 images -> NumPy feature rows.

A feature function is any pure, jittable ``fn(images uint8 [B, H, W, C]) -> {name: [B, ...]}``
(the FID Inception of ``metrics.inception``, the digits classifier of ``metrics.digits``); a
``jax.tree_util.Partial`` binding the network's weights keeps them out of the compiled program.
``FeatureExtractor`` compiles it once for a fixed global batch split over the ('data',) mesh of
every device of every process; a short last batch is padded with zeros and the padding rows are
dropped, so any image count gives exactly that many rows and no recompilation. A batch size the
devices do not divide is padded the same way, to the next multiple of the device count.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from ddpm_jax import parallel

FeatureFn = Callable[[jax.Array], dict[str, jax.Array]]


class FeatureExtractor:
    """``extractor(images)`` -> {name: float32 NumPy [n, ...]} for uint8 [n, H, W, C], n <= batch.

    Every process must pass the same images (e.g. all read the same split or sample chunk); each
    device computes its slice of the batch and every process gets all rows back.
    """

    def __init__(self, feature_fn: FeatureFn, mesh: Mesh, batch_size: int):
        self._padded = parallel.padded_batch_size(batch_size, mesh.size, "--feature_batch_size")
        self.batch_size = batch_size
        self._sharding = NamedSharding(mesh, P("data"))
        # As an argument, a Partial's bound arrays (network weights) are inputs of the program,
        # placed once on every device, rather than constants compiled into it.
        if not isinstance(feature_fn, jax.tree_util.Partial):
            feature_fn = jax.tree_util.Partial(feature_fn)
        self._feature_fn = jax.device_put(feature_fn, NamedSharding(mesh, P()))
        self._fn = jax.jit(lambda fn, images: fn(images), out_shardings=self._sharding)

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        images = np.asarray(images)
        if images.ndim != 4 or images.dtype != np.uint8:
            raise ValueError(
                f"Expected uint8 [N, H, W, C] images, got {images.dtype} {images.shape}."
            )
        n = len(images)
        if not 0 < n <= self.batch_size:
            raise ValueError(f"Got {n} images for a feature batch of {self.batch_size}.")
        if n < self._padded:
            pad = np.zeros((self._padded - n, *images.shape[1:]), np.uint8)
            images = np.concatenate([images, pad])
        batch = jax.make_array_from_callback(images.shape, self._sharding, lambda i: images[i])
        out = self._fn(self._feature_fn, batch)
        if jax.process_count() > 1:
            out = multihost_utils.process_allgather(out, tiled=True)
        return {k: np.asarray(v)[:n] for k, v in out.items()}


def rebatch(batches: Iterable[np.ndarray], batch_size: int) -> Iterator[np.ndarray]:
    """Regroups arrays of any lengths into arrays of exactly ``batch_size`` rows (the last one
    may be shorter), so the extractor always sees full batches."""
    pending: list[np.ndarray] = []
    count = 0
    for batch in batches:
        pending.append(batch)
        count += len(batch)
        while count >= batch_size:
            joined = np.concatenate(pending)
            yield joined[:batch_size]
            rest = joined[batch_size:]
            pending, count = ([rest] if len(rest) else []), len(rest)
    if count:
        yield np.concatenate(pending)


def extract(
    extractor: FeatureExtractor,
    batches: Iterable[np.ndarray],
    *,
    total: int | None = None,
    desc: str = "features",
) -> Iterator[dict[str, np.ndarray]]:
    """The features of every image of ``batches`` (uint8 arrays of any lengths), batch by batch,
    with a progress bar (images/s) on process 0."""
    with tqdm(total=total, unit="img", desc=desc, disable=jax.process_index() != 0) as bar:
        for images in rebatch(batches, extractor.batch_size):
            features = extractor(images)
            bar.update(len(images))
            yield features
