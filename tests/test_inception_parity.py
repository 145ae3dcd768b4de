"""Our FID Inception-v3 against torch-fidelity's `FeatureExtractorInceptionV3` (the pytorch-fid
port of the 2015-12-05 TF graph) with the same random weights, and our resizes against
torch-fidelity's TF1 bilinear and PyTorch's half-pixel bilinear.

Needs torch and torch-fidelity (skipped without them). torch-fidelity's package __init__ imports
torchvision, so its feature-extractor module is imported under a bare package module instead.
"""

import importlib
import importlib.util
import sys
import types
from pathlib import Path

import jax
import numpy as np
import pytest

from ddpm_jax import convert
from ddpm_jax.metrics import inception

FEATURES = ("64", "192", "768", "2048", "logits_unbiased", "logits")


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


@pytest.fixture(scope="module")
def fidelity(torch):
    """torch-fidelity's feature_extractor_inceptionv3 module, without its package __init__."""
    spec = importlib.util.find_spec("torch_fidelity")
    if spec is None:
        pytest.skip("torch-fidelity is not installed")
    saved = {k: v for k, v in sys.modules.items() if k.split(".")[0] == "torch_fidelity"}
    package = types.ModuleType("torch_fidelity")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["torch_fidelity"] = package
    try:
        return importlib.import_module("torch_fidelity.feature_extractor_inceptionv3")
    finally:
        for name in [k for k in sys.modules if k.split(".")[0] == "torch_fidelity"]:
            del sys.modules[name]
        sys.modules.update(saved)


@pytest.fixture(scope="module")
def weights_pth(torch, tmp_path_factory):
    """A .pth of random weights in the pytorch-fid layout (He-scaled convs, random BatchNorm
    running statistics with positive variances, random fc)."""
    gen = torch.Generator().manual_seed(0)
    state = {}
    shapes = jax.eval_shape(lambda: inception.FIDInceptionV3().init(
        jax.random.key(0), np.zeros((1, 299, 299, 3), np.float32)))
    for module, leaves in _torch_modules(shapes).items():
        if module == "fc":
            state["fc.weight"] = torch.randn(leaves, 2048, generator=gen) / 2048**0.5
            state["fc.bias"] = torch.randn(leaves, generator=gen)
            continue
        out_ch, in_ch, kh, kw = leaves
        state[f"{module}.conv.weight"] = (torch.randn(out_ch, in_ch, kh, kw, generator=gen)
                                          * (2 / (in_ch * kh * kw)) ** 0.5)
        state[f"{module}.bn.weight"] = 0.5 + torch.rand(out_ch, generator=gen)
        state[f"{module}.bn.bias"] = 0.2 * torch.randn(out_ch, generator=gen)
        state[f"{module}.bn.running_mean"] = 0.2 * torch.randn(out_ch, generator=gen)
        state[f"{module}.bn.running_var"] = 0.5 + 1.5 * torch.rand(out_ch, generator=gen)
        state[f"{module}.bn.num_batches_tracked"] = torch.tensor(0)
    path = tmp_path_factory.mktemp("inception") / "random_inception.pth"
    torch.save(state, path)
    return path


def _torch_modules(shapes):
    """{"Mixed_5b.branch1x1": conv OIHW shape, ..., "fc": 1008} from our variable shapes."""
    modules = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(shapes["params"])[0]:
        names = [p.key for p in path]
        if names[-2:] == ["conv", "kernel"]:
            kh, kw, in_ch, out_ch = leaf.shape
            modules[".".join(names[:-2])] = (out_ch, in_ch, kh, kw)
        elif names == ["fc", "bias"]:
            modules["fc"] = leaf.shape[0]
    return modules


@pytest.fixture(scope="module")
def theirs(fidelity, weights_pth, torch):
    torch.set_num_threads(2)
    return fidelity.FeatureExtractorInceptionV3(
        "inception-v3-compat", list(FEATURES), feature_extractor_weights_path=str(weights_pth))


@pytest.mark.parity
@pytest.mark.parametrize("shape", [(2, 32, 32, 3), (1, 299, 299, 3)])
def test_features_equal_torch_fidelitys(torch, theirs, weights_pth, shape):
    images = np.random.default_rng(shape[1]).integers(0, 256, shape, dtype=np.uint8)
    with torch.no_grad():
        want = theirs(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))
    fn = jax.jit(inception.make_inception_fn(inception.load_variables(weights_pth), "tf"))
    got = fn(images)
    for name, w in zip(FEATURES, want, strict=True):
        w = w.numpy()
        assert got[name].shape == w.shape and np.abs(w).max() > 1e-2, name
        error = np.abs(np.asarray(got[name]) - w).max() / np.abs(w).max()
        assert error < 1e-4, f"{name}: max |ours - theirs| / max |theirs| = {error:.2e}"


@pytest.mark.parity
@pytest.mark.parametrize("size", [32, 28, 400])
def test_resizes_equal_the_torch_references(torch, fidelity, size):
    x = np.random.default_rng(size).uniform(0, 255, (2, size, size, 3)).astype(np.float32)
    nchw = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    tf1 = fidelity.interpolate_bilinear_2d_like_tensorflow1x(nchw, size=(299, 299),
                                                             align_corners=False)
    half_pixel = torch.nn.functional.interpolate(nchw, size=(299, 299), mode="bilinear",
                                                 align_corners=False)
    # PyTorch's own upscaling is off the exact half-pixel formula by up to 3.3e-4 (ours: 3e-5).
    for convention, want, atol in (("tf", tf1, 1e-4), ("pytorch-fid", half_pixel, 5e-4)):
        got = np.asarray(inception.resize(x, convention)).transpose(0, 3, 1, 2)
        np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=atol, err_msg=convention)


@pytest.mark.parity
def test_converted_npz_equals_the_pth(weights_pth, tmp_path, capsys):
    npz = tmp_path / "inception_fid.npz"
    convert.main(["--inception", str(weights_pth), "--out", str(npz)])
    assert str(npz) in capsys.readouterr().out
    jax.tree.map(np.testing.assert_array_equal, inception.load_variables(npz),
                 inception.load_variables(weights_pth))
    assert Path(inception.convert_weights(weights_pth, tmp_path / "again.npz")).is_file()


@pytest.mark.parity
def test_damaged_pth_is_refused(torch, tmp_path):
    damaged = tmp_path / "damaged.pth"
    damaged.write_bytes(b"not a pickle" * 10)
    with pytest.raises(ValueError, match="is not a readable PyTorch state dict"):
        inception.load_variables(damaged)
    model = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), model)
    with pytest.raises(ValueError, match="holds a Tensor, not a state dict"):
        inception.load_variables(model)
