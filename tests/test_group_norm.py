"""GroupNorm with a custom VJP: values and gradients against a float64 reference (jax.grad of a
GroupNorm written here) and flax's nn.GroupNorm, for float32 and bfloat16 inputs, and the memory
property it exists for (the backward pass keeps no float32 copy of a bfloat16 input)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax.models.group_norm import GroupNorm, group_norm

GROUPS, EPS = 4, 1e-6
SHAPE = (2, 5, 3, 16)  # [B, H, W, C]: 4 groups of 4 channels


def reference(x, scale, bias, swish):
    """GroupNorm (then swish) in float64, two-pass variance."""
    b, h, w, c = x.shape
    g = x.reshape(b, h, w, GROUPS, c // GROUPS)
    mean = g.mean(axis=(1, 2, 4), keepdims=True)
    var = ((g - mean) ** 2).mean(axis=(1, 2, 4), keepdims=True)
    y = ((g - mean) / jnp.sqrt(var + EPS)).reshape(x.shape) * scale + bias
    return y * jax.nn.sigmoid(y) if swish else y


def _inputs():
    rng = np.random.RandomState(0)
    # An offset and per-channel spread, so that the mean matters and groups differ.
    x = 3.0 + rng.randn(*SHAPE) * np.linspace(0.5, 2.0, SHAPE[-1])
    scale = 1.0 + 0.3 * rng.randn(SHAPE[-1])
    bias = 0.2 * rng.randn(SHAPE[-1])
    cotangent = rng.randn(*SHAPE)
    return x, scale, bias, cotangent


def _value_and_grads(fn, x, scale, bias, cotangent):
    out, vjp = jax.vjp(fn, x, scale, bias)
    return (out, *vjp(cotangent.astype(out.dtype)))


def _reference_value_and_grads(x, scale, bias, cotangent, swish):
    with jax.enable_x64(True):
        f64 = [jnp.asarray(np.asarray(a, np.float64)) for a in (x, scale, bias, cotangent)]
        results = _value_and_grads(lambda *a: reference(*a, swish), *f64)
        return [np.asarray(r) for r in results]


@pytest.mark.parametrize("swish", [False, True])
@pytest.mark.parametrize("dtype, rtol", [(jnp.float32, 2e-5), (jnp.bfloat16, 2e-2)])
def test_values_and_gradients_match_float64_reference(dtype, rtol, swish):
    x, scale, bias, cotangent = _inputs()
    x_in = jnp.asarray(x, dtype)  # the reference sees the same (rounded) input
    expected = _reference_value_and_grads(np.asarray(x_in, np.float64), scale, bias, cotangent,
                                          swish)
    got = _value_and_grads(
        lambda *a: group_norm(*a, GROUPS, EPS, swish), x_in, jnp.asarray(scale, jnp.float32),
        jnp.asarray(bias, jnp.float32), jnp.asarray(cotangent, dtype))
    assert got[0].dtype == dtype and got[1].dtype == dtype  # output and dx in x's dtype
    assert got[2].dtype == got[3].dtype == jnp.float32  # d scale, d bias in the params' dtype
    for name, g, e in zip(("out", "dx", "dscale", "dbias"), got, expected, strict=True):
        g = np.asarray(g, np.float64)
        err = np.linalg.norm(g - e) / np.linalg.norm(e)
        assert err < rtol, (name, err)


def test_matches_flax_group_norm_values_and_gradients():
    x, scale, bias, cotangent = (jnp.asarray(a, jnp.float32) for a in _inputs())
    ours, theirs = GroupNorm(GROUPS, EPS), nn.GroupNorm(GROUPS, epsilon=EPS,
                                                         use_fast_variance=False)
    params = {"params": {"scale": scale, "bias": bias}}
    assert (jax.tree.map(jnp.shape, ours.init(jax.random.key(0), x))
            == jax.tree.map(jnp.shape, theirs.init(jax.random.key(0), x)))

    def run(module):
        out, vjp = jax.vjp(lambda p, x: module.apply(p, x), params, x)
        return out, vjp(cotangent)

    (out, grads), (flax_out, flax_grads) = run(ours), run(theirs)
    np.testing.assert_allclose(out, flax_out, rtol=0, atol=2e-6)
    for g, f in zip(jax.tree.leaves(grads), jax.tree.leaves(flax_grads), strict=True):
        np.testing.assert_allclose(g, f, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("swish", [False, True])
def test_backward_keeps_the_bfloat16_input_not_a_float32_copy(swish):
    x = jnp.ones(SHAPE, jnp.bfloat16)
    scale, bias = jnp.ones(SHAPE[-1]), jnp.zeros(SHAPE[-1])
    _, vjp = jax.vjp(lambda x: group_norm(x, scale, bias, GROUPS, EPS, swish), x)
    full_size = [r.dtype for r in jax.tree.leaves(vjp) if r.size == x.size]
    assert full_size == [jnp.bfloat16]  # x itself; the rest are [B, G] statistics and params
    # Autodiff through the upcast would keep float32 activations:
    _, vjp = jax.vjp(lambda x: reference(x.astype(jnp.float32), scale, bias, swish), x)
    assert jnp.float32 in [r.dtype for r in jax.tree.leaves(vjp) if r.size == x.size]


def test_groups_must_divide_channels():
    with pytest.raises(ValueError, match="4 groups do not divide the 6 channels"):
        GroupNorm(4).init(jax.random.key(0), jnp.zeros((1, 2, 2, 6)))
