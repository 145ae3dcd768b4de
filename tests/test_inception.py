"""The FID Inception-v3 without torch: shapes and size of the network, its FID-specific layers,
the two input conventions against float64 NumPy formulas, and the weights files.

Agreement with torch-fidelity itself is in test_inception_parity.py.
"""

import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from ddpm_jax import convert
from ddpm_jax.metrics import inception
from ddpm_jax.metrics.inception import FIDInceptionV3

FEATURE_DIMS = {"64": 64, "192": 192, "768": 768, "2048": 2048, "logits_unbiased": 1008,
                "logits": 1008}
NUM_PARAMS = 23_850_960  # sum(p.numel() for p in FeatureExtractorInceptionV3.parameters())
NUM_BN_STATS = 34_432  # its running_mean + running_var elements
NUM_TENSORS = 472  # its state dict without the 94 num_batches_tracked
TORCH_LEAVES = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
                "var": "running_var"}


def variable_shapes():
    return jax.eval_shape(lambda: FIDInceptionV3().init(
        jax.random.key(0), jnp.zeros((1, 299, 299, 3))))


def random_state_dict(seed=0):
    """A pytorch-fid-layout state dict (NumPy, OIHW convs, [out, in] fc) of random values."""
    rng = np.random.default_rng(seed)
    state = {}
    for path, leaf in traverse_util.flatten_dict(variable_shapes()).items():
        _, *modules, name = path
        shape = leaf.shape
        if len(shape) == 4:
            shape = (shape[3], shape[2], shape[0], shape[1])
        elif len(shape) == 2:
            shape = shape[::-1]
        value = rng.uniform(0.5, 2.0, shape) if name == "var" else rng.normal(0, 0.1, shape)
        state[".".join([*modules, TORCH_LEAVES[name]])] = value.astype(np.float32)
        if name == "var":
            state[".".join([*modules, "num_batches_tracked"])] = np.array(7)
    return state


# ----------------------------------------------------------------------------------------------
# The network.
# ----------------------------------------------------------------------------------------------
def test_output_shapes_and_size_are_torch_fidelitys():
    variables = variable_shapes()
    assert set(variables) == {"params", "batch_stats"}
    count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))  # noqa: E731
    assert count(variables["params"]) == NUM_PARAMS
    assert count(variables["batch_stats"]) == NUM_BN_STATS
    assert len(jax.tree.leaves(variables)) == NUM_TENSORS
    out = jax.eval_shape(FIDInceptionV3().apply, variables, jnp.zeros((2, 299, 299, 3)))
    assert {k: v.shape for k, v in out.items()} == {k: (2, d) for k, d in FEATURE_DIMS.items()}
    assert all(v.dtype == jnp.float32 for v in out.values())
    out = jax.eval_shape(lambda v, x: inception.make_inception_fn(v, "pytorch-fid")(x), variables,
                         jax.ShapeDtypeStruct((3, 32, 32, 1), jnp.uint8))
    assert {k: v.shape for k, v in out.items()} == {k: (3, d) for k, d in FEATURE_DIMS.items()}


def test_torch_names_map_mechanically():
    flat = {"/".join(p): v.shape for p, v in traverse_util.flatten_dict(variable_shapes()).items()}
    assert flat["params/Conv2d_1a_3x3/conv/kernel"] == (3, 3, 3, 32)  # OIHW (32, 3, 3, 3)
    assert flat["params/Mixed_6b/branch7x7_2/conv/kernel"] == (1, 7, 128, 128)
    assert flat["params/Mixed_5b/branch1x1/bn/scale"] == (64,)
    assert flat["batch_stats/Mixed_7c/branch_pool/bn/var"] == (192,)
    assert flat["params/fc/kernel"] == (2048, 1008) and flat["params/fc/bias"] == (1008,)


def test_pools_ignore_the_padding():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 5, 5, 2)), jnp.float32) - 10
    np.testing.assert_allclose(inception._avg_pool_3x3(jnp.ones((1, 5, 5, 2))), 1.0)
    np.testing.assert_allclose(inception._avg_pool_3x3(x)[0, 0, 0], x[0, :2, :2].mean((0, 1)),
                               rtol=1e-6)
    np.testing.assert_allclose(inception._max_pool_3x3(x, 1)[0, 0, 0], x[0, :2, :2].max((0, 1)))


def test_basic_conv_uses_running_statistics():
    """conv -> (x - mean) / sqrt(var + 1e-3) · scale + bias -> relu, in float32, no batch stats."""
    rng = np.random.default_rng(0)
    layer = inception._BasicConv2d(4)
    x = rng.normal(size=(2, 3, 3, 5)).astype(np.float32)
    variables = {"params": {"conv": {"kernel": rng.normal(size=(1, 1, 5, 4))},
                            "bn": {"scale": rng.normal(size=4), "bias": rng.normal(size=4)}},
                 "batch_stats": {"bn": {"mean": rng.normal(size=4),
                                        "var": rng.uniform(0.5, 2, size=4)}}}
    variables = jax.tree.map(lambda a: np.asarray(a, np.float32), variables)
    p, s = variables["params"], variables["batch_stats"]["bn"]
    h = x.astype(np.float64) @ p["conv"]["kernel"][0, 0]
    want = np.maximum((h - s["mean"]) / np.sqrt(s["var"] + 1e-3) * p["bn"]["scale"]
                      + p["bn"]["bias"], 0)
    np.testing.assert_allclose(layer.apply(variables, x), want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Input conventions, against float64 NumPy formulas.
# ----------------------------------------------------------------------------------------------
def bilinear_reference(x, size, half_pixel):
    """float64 bilinear resize of [B, H, W, C]: TF1 legacy (src = dst·in/out) or half-pixel
    (src = max((dst + 0.5)·in/out - 0.5, 0)); neighbours floor(src) and floor(src) + 1 clamped.
    src is computed in float32 as TF1's and PyTorch's kernels do (one float32 rounding of src
    moves a 350-pixel axis by up to 3e-5 pixels, i.e. up to 0.008 on 0..255 images)."""
    x = np.asarray(x, np.float64)

    def grid(n_in):
        dst, scale = np.arange(size, dtype=np.float32), np.float32(n_in) / np.float32(size)
        src = (np.maximum((dst + np.float32(0.5)) * scale - np.float32(0.5), 0) if half_pixel
               else dst * scale).astype(np.float64)
        lo = np.floor(src).astype(int)
        return lo, np.minimum(lo + 1, n_in - 1), src - lo

    y0, y1, fy = grid(x.shape[1])
    x0, x1, fx = grid(x.shape[2])
    fy, fx = fy[None, :, None, None], fx[None, None, :, None]
    top = x[:, y0][:, :, x0] * (1 - fx) + x[:, y0][:, :, x1] * fx
    bottom = x[:, y1][:, :, x0] * (1 - fx) + x[:, y1][:, :, x1] * fx
    return top * (1 - fy) + bottom * fy


@pytest.mark.parametrize("convention", inception.CONVENTIONS)
@pytest.mark.parametrize("shape", [(2, 32, 32, 3), (1, 28, 28, 1), (1, 400, 350, 2)])
def test_resize_is_the_conventions_bilinear(convention, shape):
    x = np.random.default_rng(1).uniform(0, 255, shape).astype(np.float32)
    want = bilinear_reference(x, 299, half_pixel=convention == "pytorch-fid")
    got = jax.jit(inception.resize, static_argnums=1)(x, convention)
    assert got.shape == (shape[0], 299, 299, shape[3]) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-4)


def test_the_conventions_differ_and_299_is_the_identity():
    x = np.random.default_rng(2).uniform(0, 255, (1, 32, 32, 3)).astype(np.float32)
    assert np.abs(inception.resize(x, "tf") - inception.resize(x, "pytorch-fid")).max() > 1
    x = np.random.default_rng(3).uniform(0, 255, (1, 299, 299, 3)).astype(np.float32)
    for convention in inception.CONVENTIONS:
        np.testing.assert_array_equal(inception.resize(x, convention), x)
        np.testing.assert_allclose(bilinear_reference(x, 299, convention == "pytorch-fid"), x,
                                   rtol=0, atol=1e-4)


@pytest.mark.parametrize("size", [299, 32])
def test_normalisation_of_known_pixels(size):
    pixels = np.array([0, 1, 127, 128, 254, 255], np.uint8)
    images = np.broadcast_to(pixels[:, None, None, None], (6, size, size, 3))
    tf = inception.preprocess(images, "tf")
    pt = inception.preprocess(images, "pytorch-fid")
    assert tf.shape == pt.shape == (6, 299, 299, 3) and tf.dtype == pt.dtype == jnp.float32
    p = pixels.astype(np.float64)[:, None, None, None]
    np.testing.assert_allclose(tf, np.broadcast_to((p - 128) / 128, tf.shape), rtol=0, atol=1e-6)
    np.testing.assert_allclose(pt, np.broadcast_to(p / 127.5 - 1, pt.shape), rtol=0, atol=1e-6)
    if size == 299:  # no resize: exact
        assert tf[0].min() == -1 and tf[-1].max() == 127 / 128 and pt[-1].max() == 1


def test_grey_images_are_repeated_to_rgb():
    grey = np.random.default_rng(4).integers(0, 256, (2, 28, 28, 1), dtype=np.uint8)
    for convention in inception.CONVENTIONS:
        np.testing.assert_array_equal(inception.preprocess(grey, convention),
                                      inception.preprocess(np.repeat(grey, 3, -1), convention))


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="uint8 images"):
        inception.preprocess(np.zeros((1, 32, 32, 3), np.float32))
    with pytest.raises(ValueError, match="C = 1 or 3"):
        inception.preprocess(np.zeros((1, 32, 32, 2), np.uint8))
    with pytest.raises(ValueError, match="convention 'torch'.*'tf', 'pytorch-fid'"):
        inception.make_inception_fn({}, "torch")
    with pytest.raises(ValueError, match=r"\[B, 299, 299, 3\].*preprocess"):
        jax.eval_shape(FIDInceptionV3().init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


# ----------------------------------------------------------------------------------------------
# Weights.
# ----------------------------------------------------------------------------------------------
def test_missing_weights_say_where_to_get_them(monkeypatch, tmp_path):
    monkeypatch.delenv(inception.WEIGHTS_ENV, raising=False)
    with pytest.raises(FileNotFoundError) as e:
        inception.load_variables()
    for text in (inception.WEIGHTS_FILE, inception.WEIGHTS_URL, "--inception_weights=PATH",
                 "DDPM_JAX_INCEPTION_WEIGHTS=PATH", "weights-inception-2015-12-05-6726825d.pth",
                 "python -m ddpm_jax.convert --inception"):
        assert text in str(e.value)
    missing = tmp_path / "nowhere.npz"
    monkeypatch.setenv(inception.WEIGHTS_ENV, str(missing))
    with pytest.raises(FileNotFoundError, match=f"{re.escape(str(missing))}.*"
                                                "DDPM_JAX_INCEPTION_WEIGHTS.*do not exist"):
        inception.load_variables()
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "x.pth"))):
        inception.load_variables(tmp_path / "x.pth")


def test_converted_npz_round_trips(monkeypatch, tmp_path):
    state = random_state_dict()
    variables = inception.variables_from_torch_state_dict(state)
    np.testing.assert_array_equal(variables["params"]["Mixed_6b"]["branch7x7_2"]["conv"]["kernel"],
                                  state["Mixed_6b.branch7x7_2.conv.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(variables["params"]["fc"]["kernel"], state["fc.weight"].T)
    np.testing.assert_array_equal(variables["batch_stats"]["Mixed_5b"]["branch1x1"]["bn"]["var"],
                                  state["Mixed_5b.branch1x1.bn.running_var"])
    flat = {"/".join(p): v for p, v in traverse_util.flatten_dict(variables).items()}
    path = tmp_path / "inception_fid.npz"
    np.savez(path, **flat)
    monkeypatch.setenv(inception.WEIGHTS_ENV, str(path))
    for loaded in (inception.load_variables(path), inception.load_variables()):
        jax.tree.map(np.testing.assert_array_equal, loaded, variables)
        assert all(v.dtype == np.float32 for v in jax.tree.leaves(loaded))


def test_state_dict_problems_are_all_listed():
    state = random_state_dict()
    del state["Mixed_5b.branch1x1.conv.weight"]
    state["fc.bias"] = state["fc.bias"][:1000]
    state["AuxLogits.fc.weight"] = np.zeros((1000, 768), np.float32)
    with pytest.raises(ValueError, match=r"\(3 problems\)") as e:
        inception.variables_from_torch_state_dict(state)
    for text in ("shape mismatch: fc.bias (1000,)", "missing tensor Mixed_5b.branch1x1.conv.weight",
                 "unused tensor AuxLogits.fc.weight"):
        assert text in str(e.value)


def test_damaged_and_wrong_files_are_refused(monkeypatch, tmp_path):
    damaged = tmp_path / "damaged.npz"
    damaged.write_bytes(b"not a zip file" * 10)
    with pytest.raises(ValueError, match=f"{re.escape(str(damaged))} is not a readable"):
        inception.load_variables(damaged)
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, **{"params/fc/kernel": np.zeros((2048, 1000), np.float32)})
    with pytest.raises(ValueError, match=f"{re.escape(str(wrong))} does not hold the FID") as e:
        inception.load_variables(wrong)
    assert "shape mismatch: params/fc/kernel is (2048, 1000)" in str(e.value)
    assert "missing array batch_stats/Conv2d_1a_3x3/bn/mean (32,)" in str(e.value)
    assert "and 442 more" in str(e.value)  # 472 problems, 30 listed
    pth = tmp_path / "weights.pth"
    pth.write_bytes(b"")
    monkeypatch.setitem(sys.modules, "torch", None)  # as on a host without torch
    with pytest.raises(ImportError, match=f"{re.escape(str(pth))} is a PyTorch file") as e:
        inception.load_variables(pth)
    assert f"python -m ddpm_jax.convert --inception {pth} --out inception_fid.npz" in str(e.value)


def test_convert_command_line_needs_exactly_one_source(tmp_path, capsys):
    for argv in (["--out", "x"], ["--diffusers", "a", "--inception", "b", "--out", "x"]):
        with pytest.raises(SystemExit) as e:
            convert.main(argv)
        assert e.value.code == 2
    capsys.readouterr()
    for out, message in ((tmp_path / "x.npz", "do not exist"), (tmp_path / "x", "an .npz file")):
        with pytest.raises(SystemExit) as e:
            convert.main(["--inception", str(tmp_path / "missing.pth"), "--out", str(out)])
        assert e.value.code == 2 and message in capsys.readouterr().err
