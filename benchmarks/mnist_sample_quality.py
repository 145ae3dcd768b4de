"""How recognizable generated 28x28 digits are, judged by a classifier trained on real ones.

    python -m ddpm_jax.sample --workdir=runs/mnist5k --num_samples=500 --batch_size=100
    python benchmarks/mnist_sample_quality.py runs/mnist5k/samples_ddpm_50/samples.npz

Trains a small scikit-learn MLP on 4,500 of the 5,000 real mnist5k digits and reports, for the
other 500 (the reference a perfect generator would reach) and for the samples of each NPZ (as
written by `python -m ddpm_jax.sample`), the fraction classified as their label: for
class-conditional samples, the digit they were conditioned on. Chance is 0.1. Samples without
labels get only their predicted class counts: the classifier's confidence is no substitute, as
it is confident about most uniform noise too. Not FID: a cheap, offline check that the offline
default draws the digits it is asked for.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds
from absl import app
from sklearn.neural_network import MLPClassifier

import ddpm_jax.datasets  # noqa: F401  (registers mnist5k)

_HELD_OUT = 500


def _report(
    name: str, classifier: MLPClassifier, images: np.ndarray, labels: np.ndarray | None
) -> None:
    if images.ndim != 4 or images.shape[1:] != (28, 28, 1) or images.dtype != np.uint8:
        raise ValueError(f"{name}: expected uint8 [N, 28, 28, 1] digits, got "
                         f"{images.dtype} {images.shape}.")
    predicted = classifier.predict(images.reshape(len(images), -1) / 255.0)
    line = f"{name}: {len(images)} images"
    if labels is not None:
        line += f", classified as their label {np.mean(predicted == labels):.3f}"
    print(line + f", predicted class counts {np.bincount(predicted, minlength=10)}")


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        raise app.UsageError("Pass one or more samples.npz files.")
    real = tfds.as_numpy(tfds.load("mnist5k", split="train", batch_size=-1))
    order = np.random.default_rng(0).permutation(len(real["label"]))
    train, held_out = order[_HELD_OUT:], order[:_HELD_OUT]
    classifier = MLPClassifier((256,), alpha=1e-3, max_iter=200, random_state=0)
    classifier.fit(real["image"][train].reshape(len(train), -1) / 255.0, real["label"][train])
    _report("real digits (held out)", classifier, real["image"][held_out], real["label"][held_out])
    for path in argv[1:]:
        with np.load(path) as samples:
            labels = samples["labels"] if "labels" in samples.files else None
            _report(path, classifier, samples["arr_0"], labels)


if __name__ == "__main__":
    app.run(main)
