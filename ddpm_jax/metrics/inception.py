"""The FID reference Inception-v3 (the 2015-12-05 TF graph) in Flax, its input conventions and
its weights.

The network is the port used by pytorch-fid and torch-fidelity: Inception-v3 with the FID graph's
A/C/E blocks (3×3 average pools that exclude the padding, a max pool in the last E block's pool
branch), BatchNorm with ε = 1e-3 on running statistics, and a 1008-way fc. Every convolution and
matmul is float32 at `Precision.HIGHEST` (TF32 or bf16 passes change FID). Images are NHWC.

Features (torch-fidelity's names): "64", "192", "768" are global averages of the feature maps
after the first max pool, the second max pool and Mixed_6e; "2048" is pool3 (FID, KID);
"logits_unbiased" is the fc without its bias (IS) and "logits" the fc.

Input conventions (see DESIGN.md, "Evaluation conventions"), from uint8 images:
  tf           TF1 legacy bilinear resize to 299 (source pixel = destination pixel · in/out, no
               half-pixel offset) on 0..255 values, then (x - 128) / 128, as TF-GAN and
               torch-fidelity.
  pytorch-fid  x / 255, half-pixel bilinear resize to 299 (`F.interpolate(..., "bilinear",
               align_corners=False)`), then 2x - 1, as pytorch-fid.

Weights: `pt_inception-2015-12-05-6726825d.pth` of pytorch-fid (torch-fidelity's
`weights-inception-2015-12-05-6726825d.pth` holds the same tensors). Hosts without torch use a
`.npz` made once by `python -m ddpm_jax.convert --inception PTH --out inception_fid.npz`.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from ddpm_jax import input_files

INPUT_SIZE = 299
NUM_LOGITS = 1008
BN_EPS = 1e-3
CONVENTIONS = ("tf", "pytorch-fid")
WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
               "pt_inception-2015-12-05-6726825d.pth")
WEIGHTS_ENV = "DDPM_JAX_INCEPTION_WEIGHTS"

_HIGHEST = jax.lax.Precision.HIGHEST
_CONVERT_COMMAND = "python -m ddpm_jax.convert --inception {} --out inception_fid.npz"
_HOW_TO_GET = (
    f"Download {WEIGHTS_FILE} from {WEIGHTS_URL} (torch-fidelity's "
    "weights-inception-2015-12-05-6726825d.pth holds the same tensors) and pass it with "
    f"--inception_weights=PATH or {WEIGHTS_ENV}=PATH. On hosts without torch (TPU hosts) convert "
    f"it once on a machine that has torch: {_CONVERT_COMMAND.format(WEIGHTS_FILE)}, and pass the "
    ".npz instead."
)
_MAX_LISTED = 30  # problems listed in an error message


# ----------------------------------------------------------------------------------------------
# The network.
# ----------------------------------------------------------------------------------------------
def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else v


class _BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm (running statistics, ε = 1e-3) -> ReLU; submodules `conv`
    and `bn` as in the PyTorch port. `padding` is symmetric, per spatial axis."""

    features: int
    kernel_size: int | tuple[int, int] = 1
    strides: int = 1
    padding: int | tuple[int, int] = 0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Conv(self.features, _pair(self.kernel_size), self.strides,
                    padding=[(p, p) for p in _pair(self.padding)], use_bias=False,
                    dtype=jnp.float32, precision=_HIGHEST, name="conv")(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, dtype=jnp.float32,
                         name="bn")(x)
        return nn.relu(x)


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
    """3×3, stride 1, padding 1 average over the in-image pixels only (TF's average pool)."""
    return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3(x: jax.Array, stride: int) -> jax.Array:
    padding = "VALID" if stride == 2 else ((1, 1), (1, 1))
    return nn.max_pool(x, (3, 3), (stride, stride), padding=padding)


class _InceptionA(nn.Module):
    """Mixed_5b/c/d (35×35): 1×1, 5×5, double 3×3 and average-pool branches."""

    pool_features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = _BasicConv2d(64, name="branch1x1")(x)
        b5 = _BasicConv2d(48, name="branch5x5_1")(x)
        b5 = _BasicConv2d(64, 5, padding=2, name="branch5x5_2")(b5)
        b3 = _BasicConv2d(64, name="branch3x3dbl_1")(x)
        b3 = _BasicConv2d(96, 3, padding=1, name="branch3x3dbl_2")(b3)
        b3 = _BasicConv2d(96, 3, padding=1, name="branch3x3dbl_3")(b3)
        bp = _BasicConv2d(self.pool_features, name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class _InceptionB(nn.Module):
    """Mixed_6a (35×35 -> 17×17): stride-2 3×3, double 3×3 and max-pool branches."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = _BasicConv2d(384, 3, strides=2, name="branch3x3")(x)
        bd = _BasicConv2d(64, name="branch3x3dbl_1")(x)
        bd = _BasicConv2d(96, 3, padding=1, name="branch3x3dbl_2")(bd)
        bd = _BasicConv2d(96, 3, strides=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3(x, 2)], axis=-1)


class _InceptionC(nn.Module):
    """Mixed_6b/c/d/e (17×17): 1×1, factorised 7×7, double factorised 7×7, average-pool."""

    channels_7x7: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c7 = self.channels_7x7
        b1 = _BasicConv2d(192, name="branch1x1")(x)
        b7 = _BasicConv2d(c7, name="branch7x7_1")(x)
        b7 = _BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = _BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = _BasicConv2d(c7, name="branch7x7dbl_1")(x)
        bd = _BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = _BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = _BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = _BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = _BasicConv2d(192, name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class _InceptionD(nn.Module):
    """Mixed_7a (17×17 -> 8×8): 1×1 + stride-2 3×3, 1×1 + 7×7 + stride-2 3×3, max pool."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = _BasicConv2d(192, name="branch3x3_1")(x)
        b3 = _BasicConv2d(320, 3, strides=2, name="branch3x3_2")(b3)
        b7 = _BasicConv2d(192, name="branch7x7x3_1")(x)
        b7 = _BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = _BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = _BasicConv2d(192, 3, strides=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3(x, 2)], axis=-1)


class _InceptionE(nn.Module):
    """Mixed_7b/c (8×8): 1×1, split 3×3, double split 3×3 and a pool branch, which is an
    average pool in Mixed_7b and a max pool in Mixed_7c (as in the FID graph)."""

    max_pool: bool

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = _BasicConv2d(320, name="branch1x1")(x)
        b3 = _BasicConv2d(384, name="branch3x3_1")(x)
        b3a = _BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3)
        b3b = _BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)
        bd = _BasicConv2d(448, name="branch3x3dbl_1")(x)
        bd = _BasicConv2d(384, 3, padding=1, name="branch3x3dbl_2")(bd)
        bda = _BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd)
        bdb = _BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)
        pooled = _max_pool_3x3(x, 1) if self.max_pool else _avg_pool_3x3(x)
        bp = _BasicConv2d(192, name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3a, b3b, bda, bdb, bp], axis=-1)


class _Logits(nn.Module):
    """The 1008-way fc (params `kernel` [2048, 1008] and `bias`): (x·W, x·W + b)."""

    features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        unbiased = jnp.dot(x, kernel, precision=_HIGHEST)
        return unbiased, unbiased + bias


def _global_mean(x: jax.Array) -> jax.Array:
    return jnp.mean(x, axis=(1, 2))


class FIDInceptionV3(nn.Module):
    """Inception-v3 of the FID graph: float32 [B, 299, 299, 3] in [-1, 1] (see `preprocess`) ->
    {"64", "192", "768", "2048", "logits_unbiased", "logits"} (float32 [B, dim]).

    Submodules carry the PyTorch port's names (`Conv2d_1a_3x3` … `Mixed_7c` with `branch*`
    children, each a `conv` + `bn` pair, and `fc`), so `Mixed_5b.branch1x1.conv.weight` is
    params/Mixed_5b/branch1x1/conv/kernel and `.bn.running_mean` is batch_stats/…/bn/mean.
    BatchNorm always uses the running statistics, so apply needs no mutable collections.
    """

    @nn.compact
    def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
        if x.ndim != 4 or x.shape[1:] != (INPUT_SIZE, INPUT_SIZE, 3):
            raise ValueError(f"FIDInceptionV3 takes images [B, {INPUT_SIZE}, {INPUT_SIZE}, 3] in "
                             f"[-1, 1], got shape {x.shape}; resize and normalise them with "
                             "preprocess() first.")
        x = jnp.asarray(x, jnp.float32)
        features = {}
        x = _BasicConv2d(32, 3, strides=2, name="Conv2d_1a_3x3")(x)
        x = _BasicConv2d(32, 3, name="Conv2d_2a_3x3")(x)
        x = _BasicConv2d(64, 3, padding=1, name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3(x, 2)
        features["64"] = _global_mean(x)
        x = _BasicConv2d(80, name="Conv2d_3b_1x1")(x)
        x = _BasicConv2d(192, 3, name="Conv2d_4a_3x3")(x)
        x = _max_pool_3x3(x, 2)
        features["192"] = _global_mean(x)
        x = _InceptionA(32, name="Mixed_5b")(x)
        x = _InceptionA(64, name="Mixed_5c")(x)
        x = _InceptionA(64, name="Mixed_5d")(x)
        x = _InceptionB(name="Mixed_6a")(x)
        x = _InceptionC(128, name="Mixed_6b")(x)
        x = _InceptionC(160, name="Mixed_6c")(x)
        x = _InceptionC(160, name="Mixed_6d")(x)
        x = _InceptionC(192, name="Mixed_6e")(x)
        features["768"] = _global_mean(x)
        x = _InceptionD(name="Mixed_7a")(x)
        x = _InceptionE(max_pool=False, name="Mixed_7b")(x)
        x = _InceptionE(max_pool=True, name="Mixed_7c")(x)
        features["2048"] = _global_mean(x)
        features["logits_unbiased"], features["logits"] = _Logits(NUM_LOGITS, name="fc")(
            features["2048"])
        return features


# ----------------------------------------------------------------------------------------------
# Input conventions.
# ----------------------------------------------------------------------------------------------
def _check_convention(convention: str) -> None:
    if convention not in CONVENTIONS:
        raise ValueError(f"Unknown Inception input convention {convention!r}; use one of "
                         f"{CONVENTIONS} (never compare statistics made under different ones).")


def _interpolation_matrix(in_size: int, out_size: int, convention: str) -> np.ndarray:
    """[out_size, in_size] float32 bilinear weights along one axis. Source coordinates are
    computed in float32, as TF1 and PyTorch do: `tf` src = dst · in/out, `pytorch-fid`
    src = max((dst + 0.5) · in/out - 0.5, 0); each output mixes floor(src) and the next pixel
    (clamped to the edge) with weights 1 - frac and frac."""
    scale = np.float32(in_size) / np.float32(out_size)
    dst = np.arange(out_size, dtype=np.float32)
    if convention == "tf":
        src = dst * scale
    else:
        src = np.maximum((dst + np.float32(0.5)) * scale - np.float32(0.5), np.float32(0))
    lo = np.floor(src).astype(np.int64)
    frac = src - lo.astype(np.float32)
    rows = np.arange(out_size)
    matrix = np.zeros((out_size, in_size), np.float32)
    np.add.at(matrix, (rows, lo), 1 - frac)
    np.add.at(matrix, (rows, np.minimum(lo + 1, in_size - 1)), frac)
    return matrix


def resize(images: jax.Array, convention: str = "tf", size: int = INPUT_SIZE) -> jax.Array:
    """Bilinear resize of float images [B, H, W, C] to float32 [B, size, size, C] under an input
    convention's sampling grid, as two small float32 matmuls; the identity when H = W = size."""
    _check_convention(convention)
    x = jnp.asarray(images, jnp.float32)
    _, height, width, _ = x.shape
    if (height, width) == (size, size):
        return x
    x = jnp.einsum("oh,bhwc->bowc", _interpolation_matrix(height, size, convention), x,
                   precision=_HIGHEST)
    return jnp.einsum("pw,bhwc->bhpc", _interpolation_matrix(width, size, convention), x,
                      precision=_HIGHEST)


def preprocess(images: jax.Array, convention: str = "tf") -> jax.Array:
    """uint8 images [B, H, W, C] (C = 1 or 3; grey is repeated to RGB) -> the network's float32
    input [B, 299, 299, 3] under `convention` (see the module docstring). Jittable."""
    _check_convention(convention)
    images = jnp.asarray(images)
    if images.dtype != jnp.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"Inception preprocessing takes uint8 images [B, H, W, C] with C = 1 or "
                         f"3, got {images.dtype} {images.shape}; quantise samples to uint8 first.")
    x = images.astype(jnp.float32)
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    if convention == "tf":
        return (resize(x, "tf") - 128) / 128
    return 2 * resize(x / 255, "pytorch-fid") - 1


def make_inception_fn(
    variables: Mapping[str, Any], convention: str = "tf"
) -> Callable[[jax.Array], dict[str, jax.Array]]:
    """A pure, jittable function: uint8 images [B, H, W, C] -> the FIDInceptionV3 features dict,
    with `variables` (from `load_variables`) bound. It is a `jax.tree_util.Partial`, so a jitted
    caller that takes it as an argument gets the ~95 MB of weights as inputs, not as constants
    compiled into the program."""
    _check_convention(convention)
    return jax.tree_util.Partial(functools.partial(_inception_features, convention), variables)


def _inception_features(
    convention: str, variables: Mapping[str, Any], images: jax.Array
) -> dict[str, jax.Array]:
    return FIDInceptionV3().apply(variables, preprocess(images, convention))


# ----------------------------------------------------------------------------------------------
# Weights.
# ----------------------------------------------------------------------------------------------
# (collection, our leaf name) -> PyTorch parameter or buffer name.
_TORCH_LEAVES = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}


@functools.cache
def _variable_shapes() -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flat {(collection, module, ..., leaf): shape} of FIDInceptionV3's variables."""
    shapes = jax.eval_shape(lambda: FIDInceptionV3().init(
        jax.random.key(0), jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)))
    return {path: leaf.shape for path, leaf in traverse_util.flatten_dict(shapes).items()}


def _torch_key(path: tuple[str, ...]) -> str:
    """('params', 'Mixed_5b', 'branch1x1', 'conv', 'kernel') -> 'Mixed_5b.branch1x1.conv.weight'."""
    collection, *modules, leaf = path
    return ".".join([*modules, _TORCH_LEAVES[collection, leaf]])


def _refuse(what: str, problems: list[str]) -> None:
    if problems:
        listed = problems[:_MAX_LISTED]
        if len(problems) > _MAX_LISTED:
            listed.append(f"... and {len(problems) - _MAX_LISTED} more")
        raise ValueError(f"{what} ({len(problems)} problems): " + "; ".join(listed))  # one line


def variables_from_torch_state_dict(state: Mapping[str, np.ndarray]) -> dict:
    """{"params", "batch_stats"} of FIDInceptionV3 (float32 NumPy) from the pytorch-fid /
    torch-fidelity state dict: conv OIHW -> HWIO, fc [out, in] -> [in, out], BatchNorm
    weight/bias/running_mean/running_var -> scale/bias/mean/var; `num_batches_tracked` is ignored.

    Raises ValueError listing every missing, unused or mis-shaped tensor.
    """
    unused = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    flat, problems, missing = {}, [], []
    for path, shape in _variable_shapes().items():
        key = _torch_key(path)
        if key not in unused:
            missing.append(f"missing tensor {key} {shape}")
            continue
        w = np.asarray(unused.pop(key), dtype=np.float32)
        value = w.transpose(2, 3, 1, 0) if w.ndim == 4 else w.T if w.ndim == 2 else w
        if value.shape != shape:
            problems.append(f"shape mismatch: {key} {w.shape} -> {'/'.join(path)} needs {shape}")
        flat[path] = np.ascontiguousarray(value)
    problems += missing + [f"unused tensor {k} {np.shape(v)}" for k, v in sorted(unused.items())]
    _refuse("The state dict is not the FID Inception-v3", problems)
    return traverse_util.unflatten_dict(flat)


def _variables_from_npz(flat: Mapping[str, np.ndarray]) -> dict:
    """Our variables from the flat "params/Mixed_5b/branch1x1/conv/kernel" arrays of an .npz."""
    expected = {"/".join(path): shape for path, shape in _variable_shapes().items()}
    problems = [f"shape mismatch: {k} is {np.shape(flat[k])}, needs {s}"
                for k, s in expected.items() if k in flat and np.shape(flat[k]) != s]
    problems += [f"missing array {k} {s}" for k, s in expected.items() if k not in flat]
    problems += [f"unexpected array {k}" for k in flat if k not in expected]
    _refuse("The arrays are not the FID Inception-v3", problems)
    return traverse_util.unflatten_dict(
        {tuple(k.split("/")): np.asarray(v, np.float32) for k, v in flat.items()})


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    return input_files.read_npz(
        path, ".npz file of FID Inception weights", {},
        others=input_files.ArraySpec("finite float arrays", kinds="f", finite=True),
        expected=f"the .npz file that {_CONVERT_COMMAND.format('PTH')} writes")


def _read_pth(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"{path} is a PyTorch file and reading it needs torch, which is not "
                          "installed. Convert it once on a machine that has torch: "
                          f"{_CONVERT_COMMAND.format(path)}, and pass the .npz.") from e
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises KeyError, RuntimeError, EOFError, ...
        raise ValueError(f"{path} is not a readable PyTorch state dict (damaged, or not a .pth "
                         f"file?): {type(e).__name__}: {e}") from e
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor)
                                                 for v in state.values()):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict of tensors; "
                         f"it is not {WEIGHTS_FILE}.")
    return {k: v.float().numpy() for k, v in state.items()}


def load_variables(path: str | os.PathLike | None = None) -> dict:
    """FIDInceptionV3 variables {"params", "batch_stats"} (float32 NumPy) from `path`, else from
    the file named by $DDPM_JAX_INCEPTION_WEIGHTS.

    The file is a converted `.npz` (needs no torch) or, under any other name, the original
    `.pth` (needs torch). Raises FileNotFoundError when no file is given or it does not exist
    (saying where to get it), ValueError naming the path when the file is damaged or not these
    weights, ImportError for a .pth without torch.
    """
    source = "given path"
    if path is None:
        path, source = os.environ.get(WEIGHTS_ENV), f"${WEIGHTS_ENV}"
    if not path:
        raise FileNotFoundError(f"The FID Inception-v3 weights are needed and none were given. "
                                f"{_HOW_TO_GET}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Inception weights {path} (the {source}) do not exist or are not "
                                f"a file. {_HOW_TO_GET}")
    if path.suffix.lower() == ".npz":
        arrays, convert = _read_npz(path), _variables_from_npz
    else:
        arrays, convert = _read_pth(path), variables_from_torch_state_dict
    try:
        return convert(arrays)
    except ValueError as e:
        raise ValueError(f"{path} does not hold the FID Inception-v3 weights ({WEIGHTS_FILE}): "
                         f"{e}") from None


def convert_weights(pth_path: str | os.PathLike, out_path: str | os.PathLike) -> Path:
    """Writes the weights of `pth_path` (the .pth, read with torch) to the .npz `out_path` that
    `load_variables` reads without torch; returns out_path."""
    out_path = Path(out_path)
    if out_path.suffix.lower() != ".npz":
        raise ValueError(f"The converted Inception weights are an .npz file; name it so "
                         f"(got {out_path}), e.g. inception_fid.npz.")
    variables = load_variables(pth_path)
    flat = {"/".join(path): v for path, v in traverse_util.flatten_dict(variables).items()}
    with open(out_path, "wb") as f:
        np.savez(f, **flat)
    return out_path
