"""Reference statistics: the real-image side of FID and KID, computed once and cached.

A reference is named by a source string:

    cifar10:train            a TFDS dataset and split (the DDPM paper's CIFAR-10 protocol), its
                             images preprocessed as for training (center crop, area resize to the
                             model's image size, 8 bits; no flips)
    folder:/path/to/images   every PNG/JPEG under a folder, preprocessed the same way
    /path/images.npz         uint8 NHWC images under "arr_0" (what `ddpm_jax.sample` writes)
    /path/stats.npz          ready statistics: "mu" and "sigma" (pytorch-fid's format) — FID only

The statistics file is pytorch-fid's ``.npz`` (``mu``, ``sigma``) plus the convention, image count,
source and image size as extra keys; KID's features are kept beside it (``*.features.npy``).
Statistics made under one input convention are never used under another.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from ddpm_jax import cache, files, input_files
from ddpm_jax.metrics import features as features_lib
from ddpm_jax.metrics import statistics

POOL_FEATURE = "2048"  # Inception pool3: the features of FID and KID
FEATURES_SUFFIX = ".features.npy"
FEATURES = input_files.ArraySpec("float [N, D] Inception pool features", kinds="f", ndim=2,
                                 finite=True)


@dataclass(frozen=True)
class Reference:
    """Real-image statistics: mean and covariance of the pool features, their metadata, and the
    features themselves when they were kept (KID needs them; FID only the moments)."""

    mu: np.ndarray
    sigma: np.ndarray
    metadata: dict[str, Any]
    features: np.ndarray | None = None

    @property
    def description(self) -> str:
        return str(self.metadata.get("source", "a statistics file"))


def _is_stats_file(path: str) -> bool:
    files = input_files.open_npz(path, "reference .npz", {}, expected=(
        "statistics ('mu' [D], 'sigma' [D, D]) or images ('arr_0': uint8 [N, H, W, C])")).files
    return "mu" in files and "sigma" in files


def cache_path(source: str, image_size: int, convention: str, cache_dir: str | os.PathLike) -> Path:
    """Where the statistics of ``source`` at ``image_size`` under ``convention`` are cached."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", source).strip("_")
    return Path(cache_dir) / "reference" / f"{slug}_{image_size}px_{convention}.npz"


def iter_npz_images(path: str | os.PathLike, batch_size: int, key: str = "arr_0") -> tuple[
    int, Iterator[np.ndarray]
]:
    """(count, batches) of the uint8 [N, H, W, C] images ``key`` of an .npz, read ``batch_size``
    rows at a time (50,000 256x256 images need not fit in memory); the file is checked first
    (``input_files``)."""
    npz = input_files.open_npz(path, "images .npz", {key: input_files.IMAGES})
    return npz.shapes[key][0], input_files.iter_rows(npz, key, batch_size)


def _source_images(
    source: str, data_config: ml_collections.ConfigDict, batch_size: int
) -> tuple[int, Iterator[np.ndarray]]:
    """(count, uint8 batches) of a TFDS split, a folder or an images .npz."""
    if source.endswith(".npz"):
        return iter_npz_images(source, batch_size)
    from ddpm_jax import input_pipeline  # TensorFlow only where a dataset is read

    if source.startswith(input_pipeline.FOLDER_PREFIX):
        name, split = source, "train"
    else:
        name, _, split = source.partition(":")
        split = split or "train"
    config = ml_collections.ConfigDict(dict(data_config.to_dict(), dataset=name))
    count, examples = input_pipeline.iterate_split(config, split, batch_size)
    return count, (example["image"] for example in examples)


def compute_reference(
    source: str,
    data_config: ml_collections.ConfigDict,
    extractor: features_lib.FeatureExtractor,
    convention: str,
    *,
    keep_features: bool = True,
) -> Reference:
    """Pool-feature statistics of every image of ``source`` (float64 streaming moments)."""
    count, batches = _source_images(source, data_config, extractor.batch_size)
    moments = statistics.RunningMoments()
    kept = []
    for out in features_lib.extract(extractor, batches, total=count, desc="reference"):
        moments.update(out[POOL_FEATURE])
        if keep_features:
            kept.append(out[POOL_FEATURE].astype(np.float32))
    metadata = dict(
        source=source, convention=convention, num_images=moments.count,
        image_size=int(data_config.image_size), feature=f"inception-{POOL_FEATURE}",
    )
    return Reference(moments.mean, moments.covariance, metadata,
                     np.concatenate(kept) if keep_features else None)


def save_reference(path: str | os.PathLike, reference: Reference) -> None:
    """The statistics .npz (pytorch-fid's mu, sigma + metadata) and the features beside it."""
    if jax.process_index() != 0:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if reference.features is not None:
        files.write_atomic(str(path) + FEATURES_SUFFIX, lambda f: np.save(f, reference.features))
    statistics.save_statistics(path, reference.mu, reference.sigma, **reference.metadata)


def load_reference(path: str | os.PathLike, *, need_features: bool = False) -> Reference:
    """A statistics .npz (ours or pytorch-fid's) and, if ``need_features``, its features."""
    mu, sigma, metadata = statistics.load_statistics(path)
    features = None
    if need_features:
        features_path = str(path) + FEATURES_SUFFIX
        if not os.path.exists(features_path):
            raise ValueError(
                f"KID needs the reference's features, and {path} has none beside it "
                f"({features_path}): compute the reference from its images (a TFDS split, a "
                "folder or an images .npz) instead of a statistics file, or drop kid."
            )
        features = input_files.read_npy(features_path, "KID features file", FEATURES)
    return Reference(mu, sigma, dict(metadata, source=metadata.get("source", str(path))), features)


def get_reference(
    source: str,
    data_config: ml_collections.ConfigDict,
    extractor: features_lib.FeatureExtractor,
    convention: str,
    *,
    need_features: bool,
    cache_dir: str | os.PathLike | None = None,
) -> Reference:
    """The reference of ``source`` under ``convention``: a statistics file as given, else the
    cached statistics, else computed (and cached) from the source's images."""
    if source.endswith(".npz") and not os.path.exists(source):
        raise FileNotFoundError(f"Reference file {source} does not exist.")
    if source.endswith(".npz") and _is_stats_file(source):
        reference = load_reference(source, need_features=need_features)
        saved = reference.metadata.get("convention")
        if saved is not None and saved != convention:
            raise ValueError(
                f"{source} holds statistics made under the {saved!r} convention, not "
                f"{convention!r}: never mix conventions. Pass --convention={saved} or other "
                "statistics."
            )
        return reference
    path = cache_path(source, data_config.image_size, convention, cache_dir or cache.root())
    if path.exists() and (not need_features or os.path.exists(str(path) + FEATURES_SUFFIX)):
        try:
            reference = load_reference(path, need_features=need_features)
            logging.info("Reference statistics of %s from the cache %s.", source, path)
            return reference
        except (ValueError, OSError) as e:
            logging.warning("Cached reference %s is unreadable (%s): computing it again.", path, e)
    logging.info("Computing the reference statistics of %s (%s convention) into %s.",
                 source, convention, path)
    reference = compute_reference(source, data_config, extractor, convention)
    save_reference(path, reference)
    return reference
