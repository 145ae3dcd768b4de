"""The arrays a user hands in (.npz and .npy files), opened without pickle and checked (issue 22).

Sample and image archives, reference statistics and their features, converted Inception weights
and sample chunks are all read here: ``open_npz`` checks an archive's arrays against what they
should be (``ArraySpec``: dtype, rank, shape) from the .npy headers alone, without reading the
data, so a 10 GB sample file is checked at once and streamed later (``iter_rows``); ``read_npz``
and ``read_npy`` also load the arrays, checking those that must be finite. Nothing is ever
unpickled (``allow_pickle=False``; an array of Python objects is refused from its header). A file
that is not what it should be (missing, not an archive, a pickle, text, truncated, an array
missing, of the wrong dtype or shape, NaN) is a ValueError (FileNotFoundError when missing) of
one line naming the file, what is wrong and what was expected.
"""

from __future__ import annotations

import dataclasses
import os
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping
from typing import IO

import numpy as np

PathLike = str | os.PathLike
_READ_ERRORS = (zipfile.BadZipFile, zlib.error, ValueError, EOFError, OSError, KeyError)


@dataclasses.dataclass(frozen=True)
class ArraySpec:
    """What one array must be: ``dtype`` (an exact name, e.g. "uint8") or one of the NumPy
    dtype ``kinds`` ("f" float, "iu" integer), ``ndim``, a further ``shape_ok`` rule, finite
    values (checked when loaded), and whether the archive must hold it."""

    description: str  # "uint8 [N, H, W, C] images (C = 1 or 3)"
    dtype: str | None = None
    kinds: str | None = None
    ndim: int | None = None
    shape_ok: Callable[[tuple[int, ...]], bool] | None = None
    finite: bool = False
    required: bool = True

    def problem(self, dtype: np.dtype, shape: tuple[int, ...]) -> str | None:
        ok = ((self.dtype is None or dtype == np.dtype(self.dtype))
              and (self.kinds is None or dtype.kind in self.kinds)
              and (self.ndim is None or len(shape) == self.ndim)
              and (self.shape_ok is None or self.shape_ok(shape)))
        return None if ok else f"is {dtype} {shape}, but it must be {self.description}"


IMAGES = ArraySpec("uint8 [N, H, W, C] images with N >= 1 and C = 1 or 3 (quantize samples to 8 "
                   "bits as saved sample files are)", dtype="uint8", ndim=4,
                   shape_ok=lambda s: s[0] >= 1 and s[1] >= 1 and s[2] >= 1 and s[3] in (1, 3))
LABELS = ArraySpec("integer [N] class labels", kinds="iu", ndim=1, required=False)
SAMPLES = {"arr_0": IMAGES, "labels": LABELS}  # what ddpm_jax.sample writes


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


class InputFileError(ValueError):
    """A file handed in is not what it should be."""

    def __init__(self, path: PathLike, what: str, problem: str, expected: str) -> None:
        super().__init__(f"{os.fspath(path)} is not a readable {what}: {_one_line(problem)}. "
                         f"Expected {expected}.")


def expectation(arrays: Mapping[str, ArraySpec], others: ArraySpec | None = None) -> str:
    """"an .npz archive with 'arr_0': ..., optionally 'labels': ..."."""
    parts = [f"{'' if spec.required else 'optionally '}{key!r}: {spec.description}"
             for key, spec in arrays.items()]
    if others is not None:
        parts.append(f"any other array: {others.description}")
    return "an .npz archive (np.savez) with " + ", ".join(parts)


def _what_it_is(path: PathLike) -> str:
    """What a file that is not a zip archive looks like, from its first bytes."""
    with open(path, "rb") as f:
        head = f.read(256)
    if not head:
        return "it is empty"
    if head.startswith(b"\x93NUMPY"):
        return "it is a single .npy array, not an .npz archive"
    if head.startswith(b"PK"):
        return "it is a damaged or truncated zip archive"
    if head[:1] == b"\x80" or head.startswith((b"(dp", b"(lp", b"ccopy_reg")):
        return "it is a Python pickle, which is never loaded (unpickling can run any code)"
    try:
        head.decode("utf-8")
        return "it is a text file"
    except UnicodeDecodeError:
        return "it is not a zip archive"


def _header(member: IO[bytes]) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(member)
    read = {(1, 0): np.lib.format.read_array_header_1_0,
            (2, 0): np.lib.format.read_array_header_2_0}.get(version)
    if read is None:
        raise ValueError(f"unsupported .npy format version {version}")
    return read(member)


@dataclasses.dataclass(frozen=True)
class Npz:
    """An archive whose arrays were checked against their specs from their headers."""

    path: str
    what: str
    expected: str
    shapes: dict[str, tuple[int, ...]]
    specs: dict[str, ArraySpec]

    @property
    def files(self) -> list[str]:
        return list(self.shapes)

    def error(self, problem: str) -> InputFileError:
        """The file's one-line error for ``problem`` (e.g. a relation between its arrays)."""
        return InputFileError(self.path, self.what, problem, self.expected)

    def load(self, key: str) -> np.ndarray:
        """The array ``key``, read without pickle, checked finite where its spec asks."""
        try:
            with np.load(self.path, allow_pickle=False) as f:
                array = f[key]
        except _READ_ERRORS as e:
            raise self.error(f"{key!r} is damaged or truncated ({type(e).__name__}: {e})") from None
        spec = self.specs.get(key)
        if spec is not None and spec.finite and not np.all(np.isfinite(array)):
            raise self.error(f"{key!r} holds NaN or infinite values")
        return array


def open_npz(
    path: PathLike,
    what: str,
    arrays: Mapping[str, ArraySpec],
    others: ArraySpec | None = None,
    expected: str | None = None,
) -> Npz:
    """``path`` as an .npz archive holding ``arrays`` (and any other array, checked against
    ``others`` if given), checked from the .npy headers without reading the data. ``expected``
    replaces the messages' description of the file (default: ``expectation``)."""
    path = os.fspath(path)
    expected = expected or expectation(arrays, others)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist or is not a file; expected "
                                f"{expected}.")
    if not zipfile.is_zipfile(path):
        raise InputFileError(path, what, _what_it_is(path), expected)
    shapes, specs = {}, {}
    try:
        with zipfile.ZipFile(path) as zf:
            for name in zf.namelist():
                if not name.endswith(".npy"):
                    continue
                key = name[: -len(".npy")]
                with zf.open(name) as member:
                    shape, _, dtype = _header(member)
                if dtype.hasobject:
                    raise InputFileError(path, what, f"{key!r} holds Python objects (dtype "
                                         "object), which would need pickle: never loaded", expected)
                spec = arrays.get(key, others)
                problem = None if spec is None else spec.problem(dtype, shape)
                if problem:
                    raise InputFileError(path, what, f"{key!r} {problem}", expected)
                shapes[key], specs[key] = shape, spec
    except InputFileError:
        raise
    except _READ_ERRORS as e:
        raise InputFileError(path, what, f"it is a damaged archive ({type(e).__name__}: {e})",
                             expected) from None
    missing = [key for key, spec in arrays.items() if spec.required and key not in shapes]
    if missing:
        raise InputFileError(path, what, f"it lacks the key(s) {missing} (it has "
                             f"{sorted(shapes)})", expected)
    return Npz(path, what, expected, shapes, {k: s for k, s in specs.items() if s is not None})


def read_npz(
    path: PathLike,
    what: str,
    arrays: Mapping[str, ArraySpec],
    others: ArraySpec | None = None,
    expected: str | None = None,
) -> dict[str, np.ndarray]:
    """Every array of the checked archive (``open_npz``), loaded."""
    npz = open_npz(path, what, arrays, others, expected)
    return {key: npz.load(key) for key in npz.files}


def read_npy(path: PathLike, what: str, spec: ArraySpec) -> np.ndarray:
    """A single-array .npy file, read without pickle and checked against ``spec``."""
    path = os.fspath(path)
    expected = f"an .npy array (np.save) of {spec.description}"
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist or is not a file; expected {expected}.")
    try:
        with open(path, "rb") as f:
            shape, _, dtype = _header(f)
            if dtype.hasobject:
                raise InputFileError(path, what, "it holds Python objects (dtype object), which "
                                     "would need pickle: never loaded", expected)
            problem = spec.problem(dtype, shape)
            if problem:
                raise InputFileError(path, what, f"the array {problem}", expected)
        array = np.load(path, allow_pickle=False)
    except InputFileError:
        raise
    except _READ_ERRORS as e:
        raise InputFileError(path, what, f"{type(e).__name__}: {e}", expected) from None
    if spec.finite and not np.all(np.isfinite(array)):
        raise InputFileError(path, what, "it holds NaN or infinite values", expected)
    return array


def iter_rows(npz: Npz, key: str, batch_size: int) -> Iterator[np.ndarray]:
    """The rows of the (C-order) array ``key`` of a checked archive, ``batch_size`` at a time,
    streamed from the file (50,000 256x256 images need not fit in memory)."""
    shape = npz.shapes[key]
    row = int(np.prod(shape[1:]))
    try:
        with zipfile.ZipFile(npz.path) as zf, zf.open(f"{key}.npy") as member:
            _, fortran, dtype = _header(member)
            if fortran:
                raise ValueError("a Fortran-order array; save it C-ordered (np.ascontiguousarray)")
            for start in range(0, shape[0], batch_size):
                n = min(batch_size, shape[0] - start)
                data = member.read(n * row * dtype.itemsize)
                yield np.frombuffer(data, dtype).reshape(n, *shape[1:])
    except _READ_ERRORS as e:
        raise npz.error(f"{key!r} is damaged or truncated ({type(e).__name__}: {e})") from None


def open_samples(path: PathLike, what: str = "samples .npz") -> Npz:
    """A samples / images archive (``SAMPLES``): 'arr_0' images and optional 'labels', one per
    image."""
    npz = open_npz(path, what, SAMPLES)
    if "labels" in npz.shapes and npz.shapes["labels"][0] != npz.shapes["arr_0"][0]:
        raise npz.error(f"it has {npz.shapes['arr_0'][0]} images but "
                        f"{npz.shapes['labels'][0]} labels")
    return npz
