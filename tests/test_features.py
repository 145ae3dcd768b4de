"""Batched, sharded feature extraction: exact row counts, padding dropped, one compilation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import parallel
from ddpm_jax.metrics import features


def _feature_fn(images):
    x = images.astype(jnp.float32)
    return {"mean": jnp.mean(x, axis=(1, 2, 3)), "first": x[:, 0, 0, :]}


def _reference(images):
    x = images.astype(np.float64)
    return {"mean": x.mean(axis=(1, 2, 3)), "first": x[:, 0, 0, :]}


def test_every_image_once_in_order_with_one_compilation():
    traces = []

    def fn(images):
        traces.append(images.shape)
        return _feature_fn(images)

    mesh = parallel.make_data_mesh()
    assert mesh.size == 8
    extractor = features.FeatureExtractor(fn, mesh, batch_size=16)
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 256, (n, 5, 5, 3), dtype=np.uint8) for n in (7, 16, 30, 1)]
    out = list(features.extract(extractor, batches, total=54))
    got = {k: np.concatenate([o[k] for o in out]) for k in ("mean", "first")}
    want = _reference(np.concatenate(batches))
    assert got["mean"].shape == (54,)
    np.testing.assert_allclose(got["mean"], want["mean"], rtol=1e-6)
    np.testing.assert_array_equal(got["first"], want["first"])
    assert traces == [(16, 5, 5, 3)]  # a short last batch is padded, not recompiled


def test_rebatch_regroups_into_full_batches():
    rows = np.arange(23)
    parts = [rows[:5], rows[5:6], rows[6:20], rows[20:]]
    out = list(features.rebatch(parts, 8))
    assert [len(b) for b in out] == [8, 8, 7]
    np.testing.assert_array_equal(np.concatenate(out), rows)


def test_bad_input_is_refused():
    mesh = parallel.make_data_mesh()
    with pytest.raises(ValueError, match="--feature_batch_size=0 must be a positive integer"):
        features.FeatureExtractor(_feature_fn, mesh, batch_size=0)
    extractor = features.FeatureExtractor(_feature_fn, mesh, batch_size=8)
    with pytest.raises(ValueError, match="uint8"):
        extractor(np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="9 images for a feature batch of 8"):
        extractor(np.zeros((9, 4, 4, 3), np.uint8))
    assert jax.device_count() == 8
