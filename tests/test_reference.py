"""Reference statistics: computed from a TFDS split, a folder or an images .npz, cached, reused,
and never mixed across conventions."""

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

import ddpm_jax.datasets  # noqa: F401  (registers mnist5k)
from ddpm_jax import parallel
from ddpm_jax.metrics import features, reference, statistics


def _toy_fn(images):
    """A stand-in for Inception pool3: a few pixel statistics per image."""
    x = images.astype(jnp.float32) / 255.0
    return {"2048": jnp.stack([x.mean((1, 2, 3)), x.std((1, 2, 3)), x[:, 3, 3, 0]], axis=1)}


def _toy_numpy(images):
    x = images.astype(np.float64) / 255.0
    return np.stack([x.mean((1, 2, 3)), x.std((1, 2, 3)), x[:, 3, 3, 0]], axis=1)


def _data_config(size=28, channels=1):
    return ml_collections.ConfigDict(dict(dataset="mnist5k", split="train", data_dir=None,
                                          image_size=size, num_channels=channels))


@pytest.fixture(scope="module")
def extractor():
    return features.FeatureExtractor(_toy_fn, parallel.make_data_mesh(), batch_size=16)


def test_tfds_split_statistics_match_numpy_and_are_cached(tmp_path, extractor, monkeypatch):
    real = tfds.as_numpy(tfds.load("mnist5k", split="train[:50]", batch_size=-1))["image"]
    ref = reference.get_reference("mnist5k:train[:50]", _data_config(), extractor, "tf",
                                  need_features=True, cache_dir=tmp_path)
    want = _toy_numpy(real)
    np.testing.assert_allclose(ref.mu, want.mean(0), rtol=1e-5)
    np.testing.assert_allclose(ref.sigma, np.cov(want, rowvar=False), rtol=1e-4, atol=1e-9)
    assert ref.metadata["num_images"] == 50 and ref.metadata["convention"] == "tf"
    assert ref.features.shape == (50, 3)
    path = reference.cache_path("mnist5k:train[:50]", 28, "tf", tmp_path)
    mu, sigma, meta = statistics.load_statistics(path)  # pytorch-fid's format on disk
    np.testing.assert_array_equal(mu, ref.mu)
    assert meta["source"] == "mnist5k:train[:50]"

    def fail(*args, **kwargs):
        raise AssertionError("the cached reference was not reused")

    monkeypatch.setattr(reference, "compute_reference", fail)
    again = reference.get_reference("mnist5k:train[:50]", _data_config(), extractor, "tf",
                                    need_features=True, cache_dir=tmp_path)
    np.testing.assert_array_equal(again.sigma, ref.sigma)
    with pytest.raises(AssertionError, match="not reused"):  # another convention: other stats
        reference.get_reference("mnist5k:train[:50]", _data_config(), extractor, "pytorch-fid",
                                need_features=False, cache_dir=tmp_path)


def test_images_npz_and_statistics_files(tmp_path, extractor):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (37, 8, 8, 3), dtype=np.uint8)
    np.savez_compressed(tmp_path / "images.npz", images)
    ref = reference.get_reference(str(tmp_path / "images.npz"), _data_config(8, 3), extractor,
                                  "tf", need_features=False, cache_dir=tmp_path)
    np.testing.assert_allclose(ref.mu, _toy_numpy(images).mean(0), rtol=1e-5)
    assert ref.metadata["num_images"] == 37

    # A plain pytorch-fid statistics file is used as given, for FID only.
    np.savez(tmp_path / "stats.npz", mu=ref.mu, sigma=ref.sigma)
    given = reference.get_reference(str(tmp_path / "stats.npz"), _data_config(8, 3), extractor,
                                    "tf", need_features=False)
    np.testing.assert_array_equal(given.sigma, ref.sigma)
    with pytest.raises(ValueError, match="KID needs the reference's features"):
        reference.get_reference(str(tmp_path / "stats.npz"), _data_config(8, 3), extractor, "tf",
                                need_features=True)
    statistics.save_statistics(tmp_path / "torch.npz", ref.mu, ref.sigma, convention="pytorch-fid")
    with pytest.raises(ValueError, match="'pytorch-fid' convention"):
        reference.get_reference(str(tmp_path / "torch.npz"), _data_config(8, 3), extractor, "tf",
                                need_features=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        reference.get_reference(str(tmp_path / "nope.npz"), _data_config(8, 3), extractor, "tf",
                                need_features=False)


def test_npz_images_stream_in_batches(tmp_path):
    images = np.arange(10 * 4 * 4 * 1, dtype=np.uint8).reshape(10, 4, 4, 1)
    for save in (np.savez, np.savez_compressed):
        save(tmp_path / "x.npz", images)
        count, batches = reference.iter_npz_images(tmp_path / "x.npz", 4)
        parts = list(batches)
        assert count == 10 and [len(p) for p in parts] == [4, 4, 2]
        np.testing.assert_array_equal(np.concatenate(parts), images)
    np.savez(tmp_path / "f.npz", images.astype(np.float32))
    with pytest.raises(ValueError, match="must be uint8"):
        reference.iter_npz_images(tmp_path / "f.npz", 4)
