"""Every kind of file a user hands in is opened without pickle, and one that is not what it should
be (truncated, text, a pickle, an array of objects, the wrong dtype or shape, NaN) is refused with
one line naming the file and what was expected (ddpm_jax.input_files, issue 22)."""

import io
import json
import os
import pickle
import types
from pathlib import Path

import ml_collections
import numpy as np
import PIL.Image
import pytest

from ddpm_jax import convert, generation, input_files
from ddpm_jax.datasets import image_folder
from ddpm_jax.metrics import inception, reference, statistics


class _Trap:
    """Unpickling this creates the file ``marker``: a pickle that would run code if loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _samples(path, images=None, **arrays):
    images = np.zeros((4, 8, 8, 3), np.uint8) if images is None else images
    np.savez(path, arr_0=images, **arrays)


def _statistics(path, mu=None, sigma=None):
    np.savez(path, mu=np.zeros(3) if mu is None else mu,
             sigma=np.eye(3) if sigma is None else sigma)


def _weights(path, value=None):
    np.savez(path, **{"params/fc/kernel": np.zeros((2, 2), np.float32) if value is None else value})


def _load_reference(path):
    return reference.get_reference(str(path), ml_collections.ConfigDict(dict(image_size=8)),
                                   types.SimpleNamespace(batch_size=2), "tf", need_features=False)


def _load_chunk(path):
    return generation._load_chunk(path.parent, 0)


# kind: (loader, file name, writes a valid file, writes a wrong-shape or wrong-dtype file, what
# the message says of the latter, writes a file with NaN or None)
KINDS = {
    "samples": (input_files.open_samples, "samples.npz", _samples,
                lambda p: _samples(p, np.zeros((4, 8, 8, 2), np.uint8)),
                "'arr_0' is uint8 (4, 8, 8, 2), but it must be uint8 [N, H, W, C] images", None),
    "samples_labels": (input_files.open_samples, "labelled.npz", _samples,
                       lambda p: _samples(p, labels=np.zeros(3, np.int32)),
                       "it has 4 images but 3 labels", None),
    "images": (lambda p: reference.iter_npz_images(p, 2), "images.npz", _samples,
               lambda p: _samples(p, np.zeros((4, 8, 8, 3), np.float32)),
               "'arr_0' is float32 (4, 8, 8, 3), but it must be uint8", None),
    "reference": (_load_reference, "ref.npz", _statistics,
                  lambda p: np.savez(p, mu=np.zeros(3)), None, None),
    "statistics": (statistics.load_statistics, "stats.npz", _statistics,
                   lambda p: _statistics(p, mu=np.zeros((3, 1))),
                   "'mu' is float64 (3, 1), but it must be a float [D] mean of features",
                   lambda p: _statistics(p, sigma=np.full((3, 3), np.nan))),
    # The file layer of inception.load_variables (which then wants all 472 arrays).
    "inception": (inception._read_npz, "inception_fid.npz", _weights,
                  lambda p: _weights(p, np.zeros((2, 2), np.int64)),
                  "'params/fc/kernel' is int64 (2, 2), but it must be finite float arrays",
                  lambda p: _weights(p, np.full((2, 2), np.nan, np.float32))),
    "chunk": (_load_chunk, "samples_00000.npz", _samples,
              lambda p: _samples(p, np.zeros((4, 8, 8), np.uint8)),
              "'arr_0' is uint8 (4, 8, 8), but it must be uint8 [N, H, W, C]", None),
}


def _refused(load, path, *phrases) -> str:
    with pytest.raises(ValueError) as e:
        load(path)
    message = str(e.value)
    assert "\n" not in message and str(path) in message, message
    for phrase in phrases:
        assert phrase in message, message
    return message


@pytest.mark.parametrize("kind", KINDS)
def test_a_file_that_is_not_what_it_should_be_is_one_line(kind, tmp_path):
    load, name, write, write_wrong, wrong_phrase, write_nan = KINDS[kind]
    path = tmp_path / name
    write(path)
    load(path)  # the valid file loads
    valid = path.read_bytes()

    path.write_bytes(valid[: len(valid) // 2])
    _refused(load, path, "is not a readable", "damaged or truncated zip archive")
    path.write_text("arr_0 = [1, 2, 3]\n")
    _refused(load, path, "it is a text file", "Expected ")
    marker = tmp_path / "unpickled"
    path.write_bytes(pickle.dumps({"arr_0": _Trap(marker)}))
    _refused(load, path, "a Python pickle, which is never loaded")
    assert not marker.exists()
    np.savez(path, arr_0=np.array([_Trap(marker)], dtype=object), mu=np.zeros(3),
             sigma=np.array([None], dtype=object))
    _refused(load, path, "holds Python objects (dtype object), which would need pickle")
    assert not marker.exists()
    np.save(path.with_suffix(".npy"), np.zeros(3))
    os.replace(path.with_suffix(".npy"), path)
    _refused(load, path, "a single .npy array, not an .npz archive")
    path.write_bytes(b"")
    _refused(load, path, "it is empty")
    write_wrong(path)
    if wrong_phrase is None:  # a reference .npz holding neither statistics nor images
        with pytest.raises(ValueError, match="lacks the key"):
            load(path)
    else:
        _refused(load, path, wrong_phrase)
    if write_nan is not None:
        write_nan(path)
        _refused(load, path, "holds NaN or infinite values")


def test_missing_arrays_name_what_the_file_has(tmp_path):
    path = tmp_path / "x.npz"
    np.savez(path, images=np.zeros((1, 8, 8, 3), np.uint8))
    _refused(input_files.open_samples, path, "it lacks the key(s) ['arr_0'] (it has ['images'])",
             "Expected an .npz archive (np.savez) with 'arr_0': uint8 [N, H, W, C] images")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        input_files.open_samples(tmp_path / "nowhere.npz")


def test_a_damaged_member_is_named_when_it_is_read(tmp_path):
    path = tmp_path / "x.npz"
    images = (np.arange(64 * 32 * 32 * 3) % 251).astype(np.uint8).reshape(64, 32, 32, 3)
    np.savez(path, arr_0=images)
    data = bytearray(path.read_bytes())
    offset = data.index(images.tobytes()[:64]) + 150_000  # past what reading the header reads
    data[offset:offset + 8] = b"XXXXXXXX"  # bytes changed inside the archive: a CRC mismatch
    path.write_bytes(bytes(data))
    samples = input_files.open_samples(path)  # the headers are intact
    with pytest.raises(ValueError, match=r"'arr_0' is damaged or truncated \(BadZipFile"):
        list(input_files.iter_rows(samples, "arr_0", 2))
    with pytest.raises(ValueError, match=r"'arr_0' is damaged or truncated"):
        samples.load("arr_0")


def test_kid_features_file(tmp_path):
    stats = tmp_path / "stats.npz"
    _statistics(stats)
    features = Path(str(stats) + reference.FEATURES_SUFFIX)
    np.save(features, np.zeros((5, 3), np.float32))
    assert reference.load_reference(stats, need_features=True).features.shape == (5, 3)
    load = lambda _: reference.load_reference(stats, need_features=True)  # noqa: E731
    for write, phrase in [
        (lambda: features.write_text("0.1 0.2\n"), "is not a readable KID features file"),
        (lambda: np.save(features, np.zeros(5, np.float32)), "must be float [N, D]"),
        (lambda: np.save(features, np.full((5, 3), np.nan)), "holds NaN or infinite values"),
        (lambda: np.save(features, np.array([None] * 3)), "holds Python objects"),
        (lambda: features.write_bytes(features.read_bytes()[:-7]), "is not a readable"),
    ]:
        np.save(features, np.zeros((5, 3), np.float32))
        write()
        with pytest.raises(ValueError) as e:
            load(None)
        assert str(features) in str(e.value) and phrase in str(e.value), str(e.value)


def test_diffusers_folder_files(tmp_path):
    folder = tmp_path / "unet"
    folder.mkdir()
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config.json is not a readable diffusers config \(JSON"):
        convert.load_diffusers_model(folder)
    (folder / "config.json").write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="holds a list, not a diffusers config"):
        convert.load_diffusers_model(folder)
    (folder / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    weights = folder / "diffusion_pytorch_model.safetensors"
    marker = tmp_path / "unpickled"
    for content in (b"", b"hello\n", pickle.dumps(_Trap(marker))):
        weights.write_bytes(content)
        with pytest.raises(ValueError, match=f"{weights} is not a readable safetensors file"):
            convert.load_diffusers_model(folder)
    assert not marker.exists()


@pytest.mark.parity
def test_a_pickled_diffusers_bin_is_not_unpickled(tmp_path):
    torch = pytest.importorskip("torch")
    folder = tmp_path / "unet"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    marker = tmp_path / "unpickled"
    buffer = io.BytesIO()
    torch.save({"w": _Trap(marker)}, buffer)
    (folder / "diffusion_pytorch_model.bin").write_bytes(buffer.getvalue())
    with pytest.raises(ValueError, match="diffusion_pytorch_model.bin is not a readable PyTorch"):
        convert.load_diffusers_model(folder)
    assert not marker.exists()


def test_image_folder_files(tmp_path):
    good = tmp_path / "good.png"
    PIL.Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(good)
    assert image_folder.load_image(str(good), 8, 3).shape == (8, 8, 3)
    for name, content in [("text.png", b"not an image\n"),
                          ("cut.png", good.read_bytes()[:40]),
                          ("pickle.png", pickle.dumps(np.zeros(3)))]:
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(ValueError, match=f"Cannot decode image {path}") as e:
            image_folder.load_image(str(path), 8, 3)
        assert "\n" not in str(e.value)


def test_nothing_in_the_package_loads_a_pickle():
    """Every np.load of the package says allow_pickle=False or goes through input_files."""
    root = Path(input_files.__file__).parent
    for path in root.rglob("*.py"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if "np.load(" in line:
                assert "allow_pickle=False" in line, f"{path}:{number}: {line.strip()}"
            assert "allow_pickle=True" not in line, f"{path}:{number}"
