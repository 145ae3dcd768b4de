"""The DDPM UNet: embeddings and blocks against float64 NumPy, parameter counts, config errors,
dropout, class conditioning and mixed precision."""

import math

import jax
import jax.extend
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from ddpm_jax.models import UNet, timestep_embedding, unet_from_config
from ddpm_jax.models.unet import AttnBlock, ResnetBlock

TINY = dict(ch=32, out_ch=3, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.1)
CIFAR10 = dict(ch=128, out_ch=3, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,),
               dropout=0.1)


def _init_shapes(model, size, y=None):
    return jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)),
                           jnp.zeros((1,), jnp.int32), y)
    )["params"]


def _num_params(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def _random_params(shapes, seed=1):
    """Non-trivial float32 params of the given shapes (kernels ~ N(0, 1/fan_in), norms ~ 1, biases
    ~ 0.1·N(0, 1)), built in NumPy: jit-compiling a UNet's init costs far more than its forward."""
    rng = np.random.RandomState(seed)

    def leaf(path, s):
        name = path[-1].key
        z = rng.randn(*s.shape)
        if name == "kernel":
            z /= np.sqrt(math.prod(s.shape[:-1]))
        elif name == "scale":
            z = 1.0 + 0.1 * z
        elif name == "bias":
            z *= 0.1
        return z.astype(np.float32)

    return jax.tree_util.tree_map_with_path(leaf, shapes)


# ----------------------------------------------------------------------------------------------
# Float64 NumPy references, written independently of the module.
# ----------------------------------------------------------------------------------------------
def np_concat_embedding(t, dim, max_period=10000.0):
    half = dim // 2
    freqs = np.exp(-np.log(max_period) * np.arange(half) / (half - 1))
    angles = t.astype(np.float64)[:, None] * freqs[None]
    emb = np.concatenate([np.sin(angles), np.cos(angles)], axis=1)
    return np.concatenate([emb, np.zeros((len(t), dim % 2))], axis=1)


def np_interleaved_embedding(t, dim, max_period=10000.0):
    emb = np.zeros((len(t), dim))
    for j in range(dim):
        angle = t.astype(np.float64) / max_period ** (2 * (j // 2) / dim)
        emb[:, j] = np.sin(angle) if j % 2 == 0 else np.cos(angle)
    return emb


def np_group_norm(x, p, groups=32, eps=1e-6):
    b, h, w, c = x.shape
    g = x.reshape(b, h, w, groups, c // groups)
    mean = g.mean(axis=(1, 2, 4), keepdims=True)
    var = ((g - mean) ** 2).mean(axis=(1, 2, 4), keepdims=True)
    return ((g - mean) / np.sqrt(var + eps)).reshape(x.shape) * p["scale"] + p["bias"]


def np_conv3x3(x, p):
    """'SAME' 3×3 convolution, stride 1, HWIO kernel."""
    _, h, w, _ = x.shape
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    k = np.asarray(p["kernel"], np.float64)
    out = sum(xp[:, i:i + h, j:j + w] @ k[i, j] for i in range(3) for j in range(3))
    return out + p["bias"]


def np_dense(x, p):
    return x @ np.asarray(p["kernel"], np.float64) + p["bias"]


def np_swish(x):
    return x / (1.0 + np.exp(-x))


def _f64(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


# ----------------------------------------------------------------------------------------------
# Timestep embedding.
# ----------------------------------------------------------------------------------------------
T_VALUES = np.array([0, 1, 7, 250, 999], np.int32)


@pytest.mark.parametrize("dim", [4, 7, 128])
def test_concat_embedding_matches_numpy(dim):
    got = timestep_embedding(jnp.asarray(T_VALUES), dim)
    assert got.shape == (len(T_VALUES), dim) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, np_concat_embedding(T_VALUES, dim), atol=2e-4)


@pytest.mark.parametrize("dim", [1, 5, 64])
def test_interleaved_embedding_matches_numpy(dim):
    got = timestep_embedding(jnp.asarray(T_VALUES), dim, layout="interleaved")
    assert got.shape == (len(T_VALUES), dim)
    np.testing.assert_allclose(got, np_interleaved_embedding(T_VALUES, dim), atol=2e-4)


def test_embedding_max_period_and_errors():
    got = timestep_embedding(jnp.asarray(T_VALUES), 16, max_period=100.0)
    np.testing.assert_allclose(got, np_concat_embedding(T_VALUES, 16, 100.0), atol=2e-4)
    with pytest.raises(ValueError, match="layout"):
        timestep_embedding(jnp.asarray(T_VALUES), 16, layout="sincos")
    with pytest.raises(ValueError, match="dim >= 4"):
        timestep_embedding(jnp.asarray(T_VALUES), 3)


# ----------------------------------------------------------------------------------------------
# Blocks.
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("in_ch", [32, 64])
def test_resnet_block_matches_numpy(in_ch):
    rng = np.random.RandomState(0)
    x = rng.randn(2, 8, 8, in_ch).astype(np.float32)
    temb = rng.randn(2, 128).astype(np.float32)
    block = ResnetBlock(out_ch=64)
    apply = jax.jit(block.apply, static_argnums=3)
    shapes = jax.eval_shape(lambda: block.init(jax.random.key(0), x, temb, False))["params"]
    assert ("nin_shortcut" in shapes) == (in_ch != 64)
    if in_ch == 64:  # conv2 starts at variance scale 1e-10 (as the original): block ≈ identity
        init = jax.jit(block.init, static_argnums=3)(jax.random.key(0), x, temb, False)
        np.testing.assert_allclose(apply(init, x, temb, False), x, atol=1e-3)
    params = _random_params(shapes)
    got = apply({"params": params}, x, temb, False)

    p, x64 = _f64(params), x.astype(np.float64)
    h = np_conv3x3(np_swish(np_group_norm(x64, p["norm1"])), p["conv1"])
    h = h + np_dense(np_swish(temb.astype(np.float64)), p["temb_proj"])[:, None, None, :]
    h = np_conv3x3(np_swish(np_group_norm(h, p["norm2"])), p["conv2"])
    skip = np_dense(x64, p["nin_shortcut"]) if in_ch != 64 else x64
    np.testing.assert_allclose(got, skip + h, rtol=1e-4, atol=1e-4)


def test_attn_block_matches_numpy():
    x = np.random.RandomState(0).randn(2, 4, 4, 64).astype(np.float32)
    block = AttnBlock()
    apply = jax.jit(block.apply)
    init = jax.jit(block.init)(jax.random.key(0), x)["params"]
    np.testing.assert_allclose(apply({"params": init}, x), x, atol=1e-3)  # proj_out starts ≈ 0
    params = _random_params(init)
    got = apply({"params": params}, x)

    p, x64 = _f64(params), x.astype(np.float64)
    h = np_group_norm(x64, p["norm"]).reshape(2, 16, 64)
    q, k, v = (np_dense(h, p[n]) for n in "qkv")
    logits = q @ k.transpose(0, 2, 1) / np.sqrt(64)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    want = x64 + np_dense(w @ v, p["proj_out"]).reshape(x.shape)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# The network's size and topology.
# ----------------------------------------------------------------------------------------------
def test_parameter_counts_of_the_paper_models():
    assert _num_params(_init_shapes(UNet(**CIFAR10), 32)) == 35_746_307
    big = dict(CIFAR10, ch_mult=(1, 1, 2, 2, 4, 4), dropout=0.0)
    count = _num_params(_init_shapes(UNet(**big), 256))
    assert count == 113_673_219 and 113.5e6 < count < 114.5e6


def test_attention_after_every_block_at_16x16():
    """The original: attention after each res block at 16×16 on both paths, plus the middle one."""
    names = {n for n in _init_shapes(UNet(**CIFAR10), 32) if "attn" in n}
    assert names == {"down_1_attn_0", "down_1_attn_1", "mid_attn_1",
                     "up_1_attn_0", "up_1_attn_1", "up_1_attn_2"}


@pytest.fixture(scope="module")
def tiny():
    """The tiny float32 UNet, an input batch, random params and the eval-mode output."""
    model = UNet(**TINY)
    x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
    t = jnp.array([3, 900], jnp.int32)
    params = _random_params(jax.eval_shape(model.init, jax.random.key(0), x, t)["params"])
    return model, x, t, params, jax.jit(model.apply)({"params": params}, x, t)


def test_forward_and_dropout(tiny):
    model, x, t, params, eval_out = tiny
    assert eval_out.shape == x.shape and eval_out.dtype == jnp.float32
    assert bool(jnp.isfinite(eval_out).all()) and float(jnp.abs(eval_out).mean()) > 0.1
    train = jax.jit(lambda rng: model.apply({"params": params}, x, t, train=True,
                                            rngs={"dropout": rng}))
    drop = [train(jax.random.key(s)) for s in (0, 1)]
    assert not np.allclose(drop[0], drop[1]) and not np.allclose(drop[0], eval_out)


def test_class_conditional():
    model = UNet(ch=32, out_ch=3, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(),
                 dropout=0.0, num_classes=10)
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
    t, y = jnp.array([5, 5], jnp.int32), jnp.array([1, 1], jnp.int32)
    params = _random_params(jax.eval_shape(model.init, jax.random.key(0), x, t, y)["params"])
    assert params["class_embed"]["embedding"].shape == (10, 4 * 32)
    apply = jax.jit(model.apply)
    out1, out2 = apply({"params": params}, x, t, y), apply({"params": params}, x, t, y + 1)
    assert not np.allclose(out1, out2)
    with pytest.raises(ValueError, match="needs labels y"):
        jax.eval_shape(model.apply, {"params": params}, x, t)
    with pytest.raises(ValueError, match="num_classes=None"):
        jax.eval_shape(UNet(**TINY).init, jax.random.key(0), x, t, y)


@pytest.mark.parametrize(
    "overrides, size, match",
    [
        (dict(attn_resolutions=(4,)), 16, r"attn_resolutions \[4\] never occur"),
        (dict(ch_mult=(1, 2, 2)), 18, "not divisible by 2\\*\\*\\(len\\(ch_mult\\)-1\\) = 4"),
        (dict(ch=48), 16, "multiple of the 32 GroupNorm groups"),
        (dict(ch_mult=(1, 1.5)), 16, "multiple of the 32 GroupNorm groups"),
        (dict(num_res_blocks=0), 16, "num_res_blocks >= 1"),
        (dict(dropout=1.0), 16, "dropout"),
    ],
)
def test_bad_configuration_is_a_clear_error(overrides, size, match):
    with pytest.raises(ValueError, match=match):
        _init_shapes(UNet(**dict(TINY, **overrides)), size)


def test_bad_inputs_are_clear_errors():
    model = UNet(**TINY)
    with pytest.raises(ValueError, match=r"t must have shape \[B\] = \[2\]"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((2, 16, 16, 3)), jnp.zeros((3,)))
    with pytest.raises(ValueError, match="NHWC"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((16, 16, 3)), jnp.zeros((1,)))


# ----------------------------------------------------------------------------------------------
# Mixed precision.
# ----------------------------------------------------------------------------------------------
def _eqns(jaxpr):
    """All equations of a jaxpr, nested ones (pjit, custom_jvp, ...) included."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                sub = getattr(sub, "jaxpr", sub)
                if isinstance(sub, jax.extend.core.Jaxpr):
                    yield from _eqns(sub)


def test_bfloat16_compute_with_float32_params_norms_and_softmax(tiny):
    _, x, t, params, ref = tiny
    bf16 = UNet(**TINY, dtype=jnp.bfloat16)
    bf16_init = jax.eval_shape(bf16.init, jax.random.key(0), x, t)["params"]
    assert {p.dtype for p in jax.tree.leaves(bf16_init)} == {jnp.dtype(jnp.float32)}
    assert jax.tree.structure(bf16_init) == jax.tree.structure(params)

    out = jax.jit(bf16.apply)({"params": params}, x, t)
    assert out.dtype == jnp.float32 and bool(jnp.isfinite(out).all())
    assert float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref)) < 0.05

    eqns = list(_eqns(jax.make_jaxpr(bf16.apply)({"params": params}, x, t).jaxpr))
    dtypes = {name: [{v.aval.dtype for v in e.invars} for e in eqns if e.primitive.name == name]
              for name in ("conv_general_dilated", "dot_general", "reduce_sum", "exp")}
    # Every conv in bf16 but the last (conv_out, the prediction itself), which is float32.
    convs = dtypes["conv_general_dilated"]
    assert all(d == {jnp.dtype(jnp.bfloat16)} for d in convs[:-1])
    assert convs[-1] == {jnp.dtype(jnp.float32)}
    assert all(d == {jnp.dtype(jnp.bfloat16)} for d in dtypes["dot_general"])
    # Every reduction (GroupNorm moments, softmax denominator) and exp (softmax) is float32.
    assert dtypes["reduce_sum"] and dtypes["exp"]
    assert all(d == {jnp.dtype(jnp.float32)} for d in dtypes["reduce_sum"] + dtypes["exp"])


def test_unet_from_config():
    cfg = ml_collections.ConfigDict(dict(ch=32, ch_mult=[1, 2], num_res_blocks=1,
                                         attn_resolutions=[8], dropout=0.0, dtype="bfloat16"))
    model = unet_from_config(cfg, num_channels=1)
    assert model.ch_mult == (1, 2) and model.attn_resolutions == (8,) and model.out_ch == 1
    assert model.dtype == jnp.bfloat16 and model.resamp_with_conv and model.num_classes is None
    flat = traverse_util.flatten_dict(_init_shapes(model, 16))
    assert flat[("conv_out", "kernel")].shape == (3, 3, 32, 1)
    cfg.dtype = "float64x"
    with pytest.raises(ValueError, match="model.dtype"):
        unet_from_config(cfg, num_channels=1)


# ----------------------------------------------------------------------------------------------
# Rematerialisation.
# ----------------------------------------------------------------------------------------------
def test_remat_keeps_parameters_outputs_and_gradients(tiny):
    model, x, t, params, _ = tiny

    def loss_and_grads(remat):
        m = UNet(**TINY, remat=remat)
        assert jax.tree.structure(jax.eval_shape(m.init, jax.random.key(0), x, t)["params"]) \
            == jax.tree.structure(params)
        loss = lambda p: jnp.mean(m.apply({"params": p}, x, t, train=True,  # noqa: E731
                                          rngs={"dropout": jax.random.key(3)}) ** 2)
        return jax.jit(jax.value_and_grad(loss))(params)

    expected = loss_and_grads("none")
    for remat in ("blocks", "blocks_dots"):
        got_leaves = jax.tree.leaves(loss_and_grads(remat))
        for got, want in zip(got_leaves, jax.tree.leaves(expected), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    cfg = ml_collections.ConfigDict(dict(ch=32, ch_mult=[1], num_res_blocks=1, attn_resolutions=[],
                                         dropout=0.0, remat="everything"))
    with pytest.raises(ValueError, match=r"config.model.remat='everything' is not one of none, "):
        unet_from_config(cfg, num_channels=3)
