"""GroupNorm (Wu & He 2018) with float32 statistics and a backward pass that keeps only the input.

For x [B, ..., C] in G groups of C/G channels, per example b and group g over the n = |...|·C/G
elements of the group:

    μ = mean(x),  σ² = mean((x - μ)²)  (two-pass),  r = 1/sqrt(σ² + ε),  x̂ = (x - μ)·r,
    y = x̂·γ + β                                            (γ = `scale`, β = `bias`, per channel)
    optionally followed by swish: out = y·sigmoid(y).

All of it is computed in float32 whatever x's dtype (bfloat16 inputs are upcast inside the op), and
the result is returned in x's dtype. Autodiff through the upcast would save a float32 copy of x for
the backward pass; the custom VJP here saves x itself (e.g. bfloat16) and the [B, G] statistics μ
and r, and recomputes x̂ (and y, sigmoid(y)) in float32 in the backward pass (behind an
optimization barrier, so that the compiler cannot swap the saved x for an unrounded float32 one):

    ∂β = Σ_{b,...} dy,   ∂γ = Σ_{b,...} dy·x̂,   dx = r·(g - mean(g) - x̂·mean(g·x̂)),  g = dy·γ,
    with dy = dout·s·(1 + y·(1 - s)), s = sigmoid(y), when swish is fused.

The module's parameters are flax `nn.GroupNorm`'s ('scale' and 'bias', shape [C]), so checkpoints
and converted weights are interchangeable with it.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def _grouped(x: jax.Array, num_groups: int) -> jax.Array:
    """x [B, ..., C] as float32 [B, ..., G, C/G]."""
    return x.astype(jnp.float32).reshape(x.shape[:-1] + (num_groups, x.shape[-1] // num_groups))


def _stat_axes(xg: jax.Array) -> tuple[int, ...]:
    """The axes of a grouped array that one group's statistics reduce: all but batch and group."""
    return tuple(range(1, xg.ndim - 2)) + (xg.ndim - 1,)


def _stats(xg: jax.Array, epsilon: float) -> tuple[jax.Array, jax.Array]:
    """(μ, r = 1/sqrt(σ² + ε)) of grouped float32 x, keepdims, two-pass variance."""
    axes = _stat_axes(xg)
    mean = xg.mean(axes, keepdims=True)
    var = jnp.square(xg - mean).mean(axes, keepdims=True)
    return mean, jax.lax.rsqrt(var + epsilon)


def _affine(xg: jax.Array, mean: jax.Array, rstd: jax.Array, scale: jax.Array,
            bias: jax.Array) -> jax.Array:
    """y = (x - μ)·(r·γ) + β in float32, [B, ..., C] (the operation order of flax's GroupNorm)."""
    shape = xg.shape[:-2] + (xg.shape[-2] * xg.shape[-1],)
    group_size = xg.shape[-1]
    mean = jnp.repeat(mean.reshape(mean.shape[:-2] + (-1,)), group_size, axis=-1)
    rstd = jnp.repeat(rstd.reshape(rstd.shape[:-2] + (-1,)), group_size, axis=-1)
    return (xg.reshape(shape) - mean) * (rstd * scale.astype(jnp.float32)) + bias.astype(
        jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def group_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, num_groups: int, epsilon: float,
               swish: bool) -> jax.Array:
    """GroupNorm of x [B, ..., C] (then swish if ``swish``), float32 inside, x's dtype out."""
    return _forward(x, scale, bias, num_groups, epsilon, swish)[0]


def _forward(x, scale, bias, num_groups, epsilon, swish):
    xg = _grouped(x, num_groups)
    mean, rstd = _stats(xg, epsilon)
    y = _affine(xg, mean, rstd, scale, bias)
    if swish:
        y = nn.swish(y)
    return y.astype(x.dtype), (x, mean, rstd, scale, bias)


def _backward(num_groups, epsilon, swish, residuals, dout):
    del epsilon
    x, mean, rstd, scale, bias = residuals
    # Without the barrier XLA:TPU replaced this upcast of the saved bfloat16 x by the unrounded
    # float32 sum that x was rounded from in the forward pass, and kept that float32 array for
    # the backward pass: a float32 copy after all (benchmarks/RESULTS.md, issue 21).
    xg = _grouped(jax.lax.optimization_barrier(x), num_groups)
    dy = dout.astype(jnp.float32)
    if swish:
        y = _affine(xg, mean, rstd, scale, bias)
        s = jax.nn.sigmoid(y)
        dy = dy * s * (1.0 + y * (1.0 - s))
    xhat = (xg - mean) * rstd
    batch_axes = tuple(range(x.ndim - 1))
    dyg = dy.reshape(xg.shape)
    dbias = dy.sum(batch_axes)
    dscale = (dyg * xhat).reshape(dy.shape).sum(batch_axes)
    g = dyg * scale.astype(jnp.float32).reshape(xg.shape[-2:])
    axes = _stat_axes(xg)
    dx = rstd * (g - g.mean(axes, keepdims=True)
                 - xhat * (g * xhat).mean(axes, keepdims=True))
    return dx.reshape(x.shape).astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(bias.dtype)


group_norm.defvjp(_forward, _backward)


class GroupNorm(nn.Module):
    """GroupNorm(num_groups, ε) with float32 statistics, optionally fused with swish; params as
    flax's nn.GroupNorm ('scale' ones, 'bias' zeros, [C], in ``param_dtype``)."""

    num_groups: int = 32
    epsilon: float = 1e-6
    swish: bool = False
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        if channels % self.num_groups:
            raise ValueError(f"GroupNorm: {self.num_groups} groups do not divide the {channels} "
                             "channels of the input.")
        scale = self.param("scale", nn.initializers.ones, (channels,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (channels,), self.param_dtype)
        return group_norm(x, scale, bias, self.num_groups, self.epsilon, self.swish)
