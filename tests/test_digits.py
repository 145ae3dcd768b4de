"""The offline digits metric: its classifier (accuracy, determinism, cache) and what the metrics
say about real digits, noise and a single digit."""

import logging
import os

import jax
import numpy as np
import pytest

from ddpm_jax.metrics import digits


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("digits_cache")


@pytest.fixture(scope="module")
def classifier(cache_dir):
    """The full classifier, trained once into a temporary cache for the whole module."""
    return digits.load_classifier(cache_dir)


@pytest.fixture(scope="module")
def real():
    return digits._mnist5k()


def _leaves_equal(a, b) -> bool:
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def _coverage_from_histogram(classifier, images) -> float:
    logits = jax.jit(digits.make_digits_fn(classifier))(images)["logits"]
    counts = np.bincount(np.asarray(logits).argmax(-1), minlength=10)
    p = counts[counts > 0] / counts.sum()
    return float(np.exp(-(p * np.log(p)).sum()) / 10)


def test_classifier_is_accurate_on_held_out_digits(classifier):
    assert classifier.held_out_accuracy >= 0.97


def test_digits_fn_is_a_jittable_feature_function(classifier, real):
    out = jax.jit(digits.make_digits_fn(classifier))(real[0][:7])
    assert out["features"].shape == (7, digits.FEATURE_DIM)
    assert out["logits"].shape == (7, digits.NUM_CLASSES)
    assert out["features"].dtype == out["logits"].dtype == np.float32


def test_training_is_deterministic():
    assert _leaves_equal(digits.train_classifier(20).params, digits.train_classifier(20).params)


def test_cached_classifier_is_reused(classifier, cache_dir, monkeypatch):
    path = digits.cache_file(cache_dir)
    mtime = os.stat(path).st_mtime_ns

    def no_training(num_steps):
        raise AssertionError("load_classifier retrained despite a valid cache file")

    monkeypatch.setattr(digits, "train_classifier", no_training)
    again = digits.load_classifier(cache_dir)
    assert _leaves_equal(again.params, classifier.params)
    assert again.held_out_accuracy == classifier.held_out_accuracy
    assert os.stat(path).st_mtime_ns == mtime


def test_damaged_or_other_settings_cache_is_retrained(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(digits, "TRAIN_STEPS", 5)  # a cheap classifier: only the cache is tested
    caplog.set_level(logging.INFO)
    path = digits.cache_file(tmp_path)

    def retrains(reason: str) -> digits.DigitsClassifier:
        caplog.clear()
        loaded = digits.load_classifier(tmp_path)
        lines = [r.getMessage() for r in caplog.records if "Training the digits" in r.getMessage()]
        assert len(lines) == 1 and reason in lines[0], caplog.text
        return loaded

    first = retrains("no cached classifier")
    path.write_bytes(b"not an npz")
    assert _leaves_equal(retrains("unreadable").params, first.params)
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])  # a truncated file
    retrains("unreadable")
    monkeypatch.setattr(digits, "TRAIN_STEPS", 6)
    retrains("other settings")
    caplog.clear()
    digits.load_classifier(tmp_path)
    assert "Training the digits" not in caplog.text
    assert not [p for p in os.listdir(tmp_path) if p != digits.CACHE_FILE]  # no temporary files


def test_real_digits_score_well(classifier):
    reference = digits.real_reference(500, classifier)
    assert reference["num_images"] == 500
    assert reference["digits_accuracy"] >= 0.95
    assert reference["digits_fd"] < 20
    assert reference["class_coverage"] > 0.95


def test_noise_scores_badly(classifier):
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (500, 28, 28, 1), dtype=np.uint8)
    metrics = digits.digits_metrics(noise, rng.integers(0, 10, 500), classifier)
    assert metrics["digits_accuracy"] < 0.2
    assert metrics["digits_fd"] > 10 * digits.real_reference(500, classifier)["digits_fd"]


def test_class_coverage_counts_the_digits_drawn(classifier, real):
    images, labels = real
    ones = digits.digits_metrics(images[labels == 1], None, classifier)
    assert "digits_accuracy" not in ones
    assert ones["class_coverage"] == pytest.approx(
        _coverage_from_histogram(classifier, images[labels == 1]), rel=1e-6
    )
    assert ones["class_coverage"] == pytest.approx(0.1, abs=0.02)
    everything = digits.digits_metrics(images, labels, classifier)
    assert everything["class_coverage"] == pytest.approx(
        _coverage_from_histogram(classifier, images), rel=1e-6
    )
    assert everything["class_coverage"] == pytest.approx(1.0, abs=0.01)
    assert everything["digits_fd"] == pytest.approx(0.0, abs=1e-6)  # the reference set itself


@pytest.mark.parametrize(
    "images",
    [
        np.zeros((4, 32, 32, 3), np.uint8),  # CIFAR-like RGB
        np.zeros((4, 28, 28, 1), np.float32),  # not converted to uint8
        np.zeros((28, 28, 1), np.uint8),  # no batch axis
    ],
)
def test_rejects_images_that_are_not_digits(images, classifier):
    with pytest.raises(ValueError, match="28x28x1 uint8"):
        digits.digits_metrics(images, None, classifier)


@pytest.mark.parametrize(
    "labels, message",
    [
        (np.zeros(3, np.int32), "one label per image"),
        (np.zeros(4, np.float32), "integer"),
        (np.array([0, 1, 2, 10]), "0..9"),
        (np.array([0, 1, 2, -1]), "0..9"),
    ],
)
def test_rejects_bad_labels(labels, message, classifier):
    with pytest.raises(ValueError, match=message):
        digits.digits_metrics(np.zeros((4, 28, 28, 1), np.uint8), labels, classifier)


@pytest.mark.parametrize("n", [1, 501])
def test_real_reference_rejects_counts_beyond_the_held_out_set(n, classifier):
    with pytest.raises(ValueError, match="between 2 and 500"):
        digits.real_reference(n, classifier)
