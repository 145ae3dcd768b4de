"""The offline digits metric: how real 28x28 digit samples look to a small CNN trained here on
real digits. A digits-only check for users with no Inception weights; not FID.

The classifier (two 3x3 convolutions and max-pools, a 128-wide dense feature layer, a 10-way
head) is trained by this module on 4,500 of the 5,000 real `mnist5k` digits, holding out a fixed
500 (a seeded permutation), with a fixed seed and batch order: identical software gives identical
parameters. It trains in seconds on a CPU and is cached as an .npz (`cache_file`), retrained when
the file is missing, damaged or made with other settings. Metrics (`digits_metrics`):

* ``digits_fd``: the Fréchet distance between Gaussians fitted to the classifier features (the
  128 pre-activation units of the penultimate layer) of the images and of all 5,000 real digits;
* ``digits_accuracy`` (given labels): the fraction classified as their label;
* ``class_coverage``: exp(entropy of the predicted-class histogram) / 10, the effective number of
  digits drawn over 10: 1.0 when every digit is drawn equally often, 0.1 for a single digit;
* ``num_images``.

`real_reference(n)` gives the same figures for n held-out real digits, the bar for n samples.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tensorflow_datasets as tfds
from absl import logging
from flax import traverse_util

import ddpm_jax.datasets  # noqa: F401  (registers mnist5k)
from ddpm_jax import cache, files
from ddpm_jax.metrics import statistics

IMAGE_SHAPE = (28, 28, 1)
NUM_CLASSES = 10
FEATURE_DIM = 128
HELD_OUT = 500  # real digits the classifier never trains on
REFERENCE = "mnist5k:train"  # digits_fd compares with all of these real digits
NUM_REFERENCE = 5000
TRAIN_STEPS = 600  # Adam steps of batch 64: about 8.5 passes over the 4,500 training digits
CACHE_FILE = "digits_classifier.npz"

_CONV_WIDTHS = (16, 32)
_BATCH_SIZE = 64
_LEARNING_RATE = 2e-3  # cosine-decayed to 0 over the training steps
_SEED = 0  # parameter init, batch order and the held-out split
_FORMAT_VERSION = 1  # bump when training or the file layout changes in ways settings don't show
_EVAL_BATCH = 500


class DigitsCNN(nn.Module):
    """uint8 [B, 28, 28, 1] -> {"features": [B, 128], "logits": [B, 10]} (float32); pixels are
    scaled by 1/255 inside. The features are the penultimate dense layer before its ReLU (no
    always-zero units, so their covariance is full rank)."""

    @nn.compact
    def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
        h = images.astype(jnp.float32) / 255.0
        for width in _CONV_WIDTHS:
            h = nn.max_pool(nn.relu(nn.Conv(width, (3, 3))(h)), (2, 2), strides=(2, 2))
        features = nn.Dense(FEATURE_DIM)(h.reshape(h.shape[0], -1))
        return {"features": features, "logits": nn.Dense(NUM_CLASSES)(nn.relu(features))}


_MODEL = DigitsCNN()


@dataclasses.dataclass(frozen=True, eq=False)
class DigitsClassifier:
    """The trained classifier's parameters and its accuracy on the 500 held-out real digits."""

    params: Any
    held_out_accuracy: float


def make_digits_fn(classifier: DigitsClassifier) -> Callable[[jax.Array], dict[str, jax.Array]]:
    """A pure, jittable ``fn(images uint8 [B, 28, 28, 1]) -> {"features": float32 [B, 128],
    "logits": float32 [B, 10]}`` (the feature-function contract of ``metrics.features``)."""
    params = classifier.params

    def digits_fn(images: jax.Array) -> dict[str, jax.Array]:
        return _MODEL.apply({"params": params}, images)

    return digits_fn


# ----------------------------------------------------------------------------------------------
# The real digits and the classifier's training.
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """All 5,000 `mnist5k` digits (uint8 [5000, 28, 28, 1], read-only) and their labels."""
    data = tfds.as_numpy(tfds.load("mnist5k", split="train", batch_size=-1))
    images, labels = data["image"], data["label"].astype(np.int32)
    images.flags.writeable = labels.flags.writeable = False
    return images, labels


def _split() -> tuple[np.ndarray, np.ndarray]:
    """(training, held-out) indices into `_mnist5k`: a seeded permutation's last 4,500 / first
    500."""
    order = np.random.default_rng(_SEED).permutation(len(_mnist5k()[1]))
    return order[HELD_OUT:], order[:HELD_OUT]


def _optimizer(num_steps: int) -> optax.GradientTransformation:
    return optax.adam(optax.cosine_decay_schedule(_LEARNING_RATE, num_steps))


@functools.partial(jax.jit, static_argnames="num_steps")
def _train_step(
    params: Any, opt_state: Any, images: jax.Array, labels: jax.Array, num_steps: int
) -> tuple[Any, Any]:
    """One Adam step on the softmax cross-entropy of a batch. (A Python loop over this step:
    XLA's CPU back-end runs convolutions inside a lax.scan about 10x slower.)"""

    def loss_fn(p):
        logits = _MODEL.apply({"params": p}, images)["logits"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    updates, opt_state = _optimizer(num_steps).update(jax.grad(loss_fn)(params), opt_state, params)
    return optax.apply_updates(params, updates), opt_state


_apply = jax.jit(lambda params, images: _MODEL.apply({"params": params}, images))


def _outputs(params: Any, images: np.ndarray) -> dict[str, np.ndarray]:
    """Features and logits of uint8 [N, 28, 28, 1] images, in fixed batches (one compilation)."""
    parts = []
    for start in range(0, len(images), _EVAL_BATCH):
        batch = images[start : start + _EVAL_BATCH]
        padded = np.zeros((_EVAL_BATCH, *IMAGE_SHAPE), np.uint8)
        padded[: len(batch)] = batch
        out = _apply(params, padded)
        parts.append({k: np.asarray(v)[: len(batch)] for k, v in out.items()})
    return {k: np.concatenate([p[k] for p in parts]) for k in ("features", "logits")}


def train_classifier(num_steps: int = TRAIN_STEPS) -> DigitsClassifier:
    """Train the classifier from scratch (no cache): ``num_steps`` Adam steps of batch 64 over
    the 4,500 training digits in a fixed order; deterministic for identical software."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}.")
    images, labels = _mnist5k()
    train, held_out = _split()
    rng = np.random.default_rng(_SEED)
    epochs = -(-num_steps * _BATCH_SIZE // len(train))
    order = np.concatenate([rng.permutation(train) for _ in range(epochs)])
    batches = order[: num_steps * _BATCH_SIZE].reshape(num_steps, _BATCH_SIZE)
    params = _MODEL.init(jax.random.key(_SEED), np.zeros((1, *IMAGE_SHAPE), np.uint8))["params"]
    opt_state = _optimizer(num_steps).init(params)
    for batch in batches:
        params, opt_state = _train_step(params, opt_state, images[batch], labels[batch], num_steps)
    params = jax.device_get(params)
    predicted = _outputs(params, images[held_out])["logits"].argmax(-1)
    return DigitsClassifier(params, float(np.mean(predicted == labels[held_out])))


# ----------------------------------------------------------------------------------------------
# The cache.
# ----------------------------------------------------------------------------------------------


def cache_file(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the classifier is cached: ``cache_dir`` (default ``$DDPM_JAX_CACHE``, else
    ``$XDG_CACHE_HOME/ddpm_jax``, else ``~/.cache/ddpm_jax``) / digits_classifier.npz."""
    return Path(cache_dir if cache_dir is not None else cache.root()) / CACHE_FILE


def _fingerprint(num_steps: int) -> str:
    """A hash of everything the trained parameters depend on: settings and the digits."""
    images, labels = _mnist5k()
    settings = {
        "format": _FORMAT_VERSION, "conv_widths": _CONV_WIDTHS, "feature_dim": FEATURE_DIM,
        "held_out": HELD_OUT, "num_steps": num_steps, "batch_size": _BATCH_SIZE,
        "learning_rate": _LEARNING_RATE, "seed": _SEED,
        "data": hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest(),
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _read_cache(path: Path, fingerprint: str) -> tuple[DigitsClassifier | None, str]:
    """(classifier, "") from a valid cache file, else (None, why it can't be used)."""
    if not path.is_file():
        return None, f"no cached classifier at {path}"
    dummy = jax.ShapeDtypeStruct((1, *IMAGE_SHAPE), jnp.uint8)
    shapes = jax.eval_shape(_MODEL.init, jax.random.key(0), dummy)["params"]
    expected = traverse_util.flatten_dict(shapes, sep="/")
    try:
        with np.load(path, allow_pickle=False) as data:
            if str(data["fingerprint"]) != fingerprint:
                return None, f"{path} was trained with other settings or data"
            flat = {key: data[f"params/{key}"] for key in expected}
            accuracy = float(data["held_out_accuracy"])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        return None, f"{path} is unreadable ({type(e).__name__}: {e})"
    if any(flat[k].shape != v.shape or flat[k].dtype != v.dtype for k, v in expected.items()):
        return None, f"{path} holds parameters of another shape"
    return DigitsClassifier(traverse_util.unflatten_dict(flat, sep="/"), accuracy), ""


def _write_cache(path: Path, classifier: DigitsClassifier, fingerprint: str) -> None:
    """Write the cache file atomically (``files.write_atomic``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {
        f"params/{k}": np.asarray(v)
        for k, v in traverse_util.flatten_dict(classifier.params, sep="/").items()
    }
    files.write_atomic(path, lambda f: np.savez(
        f, fingerprint=np.asarray(fingerprint),
        held_out_accuracy=np.asarray(classifier.held_out_accuracy), **arrays,
    ))


def load_classifier(cache_dir: str | os.PathLike | None = None) -> DigitsClassifier:
    """The classifier from the cache (see `cache_file`), trained and cached first if the file is
    missing, damaged or of other settings (about 10-20 s on a 2-core CPU)."""
    path = cache_file(cache_dir)
    fingerprint = _fingerprint(TRAIN_STEPS)
    classifier, why = _read_cache(path, fingerprint)
    if classifier is None:
        logging.info("Training the digits classifier on 4,500 real digits, caching it at %s (%s).",
                     path, why)
        classifier = train_classifier(TRAIN_STEPS)
        _write_cache(path, classifier, fingerprint)
    return classifier


# ----------------------------------------------------------------------------------------------
# The metrics.
# ----------------------------------------------------------------------------------------------


def _check_images(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE or images.dtype != np.uint8:
        raise ValueError(
            f"The digits metric is for 28x28x1 uint8 digit images [N, 28, 28, 1], got "
            f"{images.dtype} {images.shape}; convert model outputs in [-1, 1] with "
            "ddpm_jax.images.to_uint8, and use FID for other image shapes."
        )
    if len(images) < 2:
        raise ValueError(f"The digits metric needs at least 2 images, got {len(images)}.")
    return images


def _check_labels(labels: np.ndarray | None, num_images: int) -> np.ndarray | None:
    if labels is None:
        return None
    labels = np.asarray(labels)
    if labels.shape != (num_images,) or labels.dtype.kind not in "iu":
        raise ValueError(
            f"labels must be a 1-D integer array with one label per image ({num_images}), got "
            f"{labels.dtype} {labels.shape}."
        )
    if labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise ValueError(
            f"labels must be digits 0..{NUM_CLASSES - 1}, got values from {labels.min()} to "
            f"{labels.max()}."
        )
    return labels


def class_coverage(predicted: np.ndarray) -> float:
    """exp(entropy of the histogram of predicted classes) / 10: the effective number of digits
    drawn, over 10. 1.0 = all ten equally often; 0.1 = a single one."""
    p = np.bincount(np.asarray(predicted), minlength=NUM_CLASSES) / len(predicted)
    p = p[p > 0]
    return float(np.exp(-np.sum(p * np.log(p))) / NUM_CLASSES)


def _moments(features: np.ndarray) -> statistics.RunningMoments:
    moments = statistics.RunningMoments()
    moments.update(features)
    return moments


def digits_metrics(
    images: np.ndarray, labels: np.ndarray | None = None,
    classifier: DigitsClassifier | None = None,
) -> dict[str, float]:
    """``digits_fd``, ``class_coverage``, ``num_images`` and, given labels (e.g. the classes
    conditional samples were drawn for), ``digits_accuracy`` of uint8 [N, 28, 28, 1] digits
    (see the module docstring). ``classifier`` defaults to `load_classifier()`."""
    images = _check_images(images)
    labels = _check_labels(labels, len(images))
    if classifier is None:
        classifier = load_classifier()
    out = _outputs(classifier.params, images)
    ours = _moments(out["features"])
    real = _moments(_outputs(classifier.params, _mnist5k()[0])["features"])
    predicted = out["logits"].argmax(-1)
    metrics = {
        "digits_fd": statistics.frechet_distance(
            ours.mean, ours.covariance, real.mean, real.covariance
        ),
        "class_coverage": class_coverage(predicted),
        "num_images": len(images),
    }
    if labels is not None:
        metrics["digits_accuracy"] = float(np.mean(predicted == labels))
    return metrics


def real_reference(n: int, classifier: DigitsClassifier | None = None) -> dict[str, float]:
    """`digits_metrics` of the first ``n`` (2..500) held-out real digits with their true labels:
    what a perfect generator scores with ``n`` samples (the reference Gaussian is fitted to all
    5,000 digits, these included). Read a sample figure against the one for the same n: the
    Fréchet distance is biased upwards at small sample counts (its covariance estimate is noisy),
    so real digits score above 0, the more so the smaller n (about 7 at n = 500, 33 at n = 100);
    class coverage is biased downwards the same way."""
    if not 2 <= n <= HELD_OUT:
        raise ValueError(f"n must be between 2 and {HELD_OUT} held-out digits, got {n}.")
    images, labels = _mnist5k()
    held_out = _split()[1][:n]
    return digits_metrics(images[held_out], labels[held_out], classifier)
