"""The DDPM UNet of Ho et al. 2020 (Appendix B), as in the original `diffusion_tf/models/unet.py`.

Topology (PixelCNN++-style Wide-ResNet UNet):

    temb = Dense(4ch) ∘ swish ∘ Dense(4ch) (sinusoidal(t, ch))  [+ Embed(y) if class-conditional]
    conv_in; for each level: num_res_blocks × (ResnetBlock [-> self-attention at attn resolutions]),
             then a stride-2 conv (or 2×2 avg-pool) except after the last level;
    middle:  ResnetBlock -> self-attention -> ResnetBlock;
    up path: for each level, num_res_blocks + 1 × (ResnetBlock on concat[h, skip]
             [-> self-attention]), then nearest ×2 upsample + conv except after level 0;
    GroupNorm -> swish -> conv_out.

Every norm is GroupNorm(32 groups, ε = 1e-6). Kernels use the original's initialiser
(variance scaling, fan_avg, uniform) and the convolutions that close a residual branch
(`conv2`, `proj_out`, `conv_out`) start at scale 1e-10, so the initial network is ≈ the identity
on each residual stream and outputs ≈ 0. Images are NHWC; the "resolution" of a level is its
height, as in the original.

Mixed precision: `dtype` is the compute dtype, `param_dtype` the parameter dtype; GroupNorm
statistics, the attention softmax and the output conv are always (at least) float32. GroupNorm
(fused with the swish that follows it) keeps only its input for the backward pass, not a float32
copy; `remat` recomputes the inside of each ResnetBlock and AttnBlock in the backward pass.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from ddpm_jax.models.group_norm import GroupNorm

Dtype = Any

NUM_GROUPS = 32  # GroupNorm groups of the original (tf.contrib.layers.group_norm defaults).
NORM_EPS = 1e-6
EMBEDDING_LAYOUTS = ("concat", "interleaved")
# Rematerialisation of each ResnetBlock and AttnBlock (`config.model.remat`): what the forward
# pass keeps inside a block for the backward pass; the rest is recomputed from the block's inputs.
REMAT_POLICIES = {
    "none": None,  # no rematerialisation: autodiff keeps what it needs
    "blocks": jax.checkpoint_policies.nothing_saveable,  # only each block's inputs
    "blocks_dots": jax.checkpoint_policies.dots_saveable,  # + conv and matmul outputs
}


def timestep_embedding(
    t: jax.Array, dim: int, *, max_period: float = 10000.0, layout: str = "concat"
) -> jax.Array:
    """Sinusoidal embedding [B, dim] (float32) of the timesteps t [B].

    layout="concat": the original DDPM / tensor2tensor layout, with half = dim // 2,
        f_i = exp(-log(max_period) · i / (half - 1)), emb = [sin(t f), cos(t f)], zero-padded
        by one column when dim is odd (needs dim >= 4).
    layout="interleaved": the Transformer positional encoding (Vaswani et al. 2017, §3.5),
        PE(t, 2i) = sin(t / max_period^(2i/dim)), PE(t, 2i+1) = cos(t / max_period^(2i/dim)),
        defined for any dim >= 1, odd included.
    """
    if layout not in EMBEDDING_LAYOUTS:
        raise ValueError(f"timestep_embedding: layout={layout!r}; use one of {EMBEDDING_LAYOUTS}.")
    t = jnp.asarray(t, jnp.float32)
    if t.ndim != 1:
        raise ValueError(f"timestep_embedding: t must have shape [B], got {t.shape}.")
    if layout == "concat":
        if dim < 4:
            raise ValueError(f"timestep_embedding: the concat layout needs dim >= 4, got {dim}.")
        half = dim // 2
        freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - 1))
        angles = t[:, None] * freqs[None, :]
        emb = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=1)
        return jnp.pad(emb, ((0, 0), (0, dim % 2)))
    if dim < 1:
        raise ValueError(f"timestep_embedding: dim must be >= 1, got {dim}.")
    j = jnp.arange(dim)
    freqs = jnp.exp(-math.log(max_period) * (j - j % 2).astype(jnp.float32) / dim)
    angles = t[:, None] * freqs[None, :]
    return jnp.where(j % 2 == 0, jnp.sin(angles), jnp.cos(angles))


# ----------------------------------------------------------------------------------------------
# Layers with the original's defaults. `module` is the linen module creating them (its compute
# and parameter dtypes are used); call these from inside its compact method.
# ----------------------------------------------------------------------------------------------
def _kernel_init(scale: float) -> nn.initializers.Initializer:
    """The original `default_init`: variance scaling, fan_avg, uniform; scale 0 means 1e-10."""
    return nn.initializers.variance_scaling(scale or 1e-10, "fan_avg", "uniform")


def _conv(module: nn.Module, features: int, name: str, *, init_scale: float = 1.0, strides: int = 1,
          padding: Any = 1, dtype: Dtype | None = None) -> nn.Conv:
    """3×3 conv in ``dtype`` (default: the module's compute dtype)."""
    return nn.Conv(features, (3, 3), strides=strides, padding=padding,
                   kernel_init=_kernel_init(init_scale), dtype=dtype or module.dtype,
                   param_dtype=module.param_dtype, name=name)


def _dense(module: nn.Module, features: int, name: str, *, init_scale: float = 1.0) -> nn.Dense:
    """Dense over the last axis; on feature maps this is the original's `nin` (a 1×1 conv)."""
    return nn.Dense(features, kernel_init=_kernel_init(init_scale), dtype=module.dtype,
                    param_dtype=module.param_dtype, name=name)


def _group_norm(module: nn.Module, x: jax.Array, name: str, *, swish: bool = False) -> jax.Array:
    """GroupNorm(32, ε=1e-6) in float32 (two-pass variance), then swish if ``swish``; returns
    x's dtype and keeps only x (not a float32 copy) for the backward pass."""
    return GroupNorm(NUM_GROUPS, NORM_EPS, swish=swish, param_dtype=module.param_dtype,
                     name=name)(x)


# ----------------------------------------------------------------------------------------------
# Blocks.
# ----------------------------------------------------------------------------------------------
class ResnetBlock(nn.Module):
    """h = conv1(swish(GN(x))) + Dense(swish(temb)); h = conv2(dropout(swish(GN(h)))); x + h.

    The shortcut is a 1×1 projection (`nin_shortcut`) when the channel count changes.
    """

    out_ch: int
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array, train: bool) -> jax.Array:
        h = _group_norm(self, x, "norm1", swish=True)
        h = _conv(self, self.out_ch, "conv1")(h)
        h = h + _dense(self, self.out_ch, "temb_proj")(nn.swish(temb))[:, None, None, :]
        h = _group_norm(self, h, "norm2", swish=True)
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = _conv(self, self.out_ch, "conv2", init_scale=0.0)(h)
        if x.shape[-1] != self.out_ch:
            x = _dense(self, self.out_ch, "nin_shortcut")(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H·W positions with a residual connection.

    w = softmax(q kᵀ / sqrt(C)) over the H·W keys (logits and softmax in float32),
    out = x + proj_out(w v), with q, k, v 1×1 projections of GN(x).
    """

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, height, width, c = x.shape
        h = _group_norm(self, x, "norm").reshape(b, height * width, c)
        q = _dense(self, c, "q")(h)
        k = _dense(self, c, "k")(h)
        v = _dense(self, c, "v")(h)
        logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32)
        w = jax.nn.softmax(logits * c**-0.5, axis=-1).astype(v.dtype)
        h = jnp.einsum("bqk,bkc->bqc", w, v)
        h = _dense(self, c, "proj_out", init_scale=0.0)(h)
        return x + h.reshape(x.shape)


# ----------------------------------------------------------------------------------------------
# The network.
# ----------------------------------------------------------------------------------------------
class UNet(nn.Module):
    """The network of Ho et al. 2020 (ε_θ there; x_0 or v when trained so): x_t [B,H,W,C],
    t int [B] -> [B,H,W,out_ch] (>= float32).

    Parameter names follow the original TF scopes: `temb_dense{0,1}`, `conv_in`,
    `down_{level}_block_{i}`, `down_{level}_attn_{i}`, `down_{level}_downsample`, `mid_block_1`,
    `mid_attn_1`, `mid_block_2`, `up_{level}_block_{i}`, `up_{level}_attn_{i}`,
    `up_{level}_upsample`, `norm_out`, `conv_out` (and `class_embed` if num_classes is set).

    ``null_class`` (classifier-free guidance, Ho & Salimans 2022) adds one row to `class_embed`:
    label ``num_classes`` is the learned "no class" embedding ∅. Without it `class_embed` has
    exactly ``num_classes`` rows, as in checkpoints made before guidance existed.
    """

    ch: int
    out_ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    attn_resolutions: tuple[int, ...]
    dropout: float
    resamp_with_conv: bool = True
    num_classes: int | None = None
    null_class: bool = False
    remat: str = "none"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self) -> None:
        """Checks the parts of the configuration that need no input shape."""
        if not self.ch_mult or self.num_res_blocks < 1:
            raise ValueError(f"UNet: need a non-empty ch_mult and num_res_blocks >= 1, got "
                             f"ch_mult={self.ch_mult}, num_res_blocks={self.num_res_blocks}.")
        widths = [self.ch] + [self.ch * m for m in self.ch_mult]
        if any(w <= 0 or w % NUM_GROUPS for w in widths):
            raise ValueError(
                f"UNet: every width (ch={self.ch} and ch*ch_mult={widths[1:]}) must be a positive "
                f"multiple of the {NUM_GROUPS} GroupNorm groups; choose ch as a multiple of 32.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"UNet: dropout must be in [0, 1), got {self.dropout}.")
        if self.num_classes is not None and self.num_classes < 1:
            raise ValueError(f"UNet: num_classes must be None or >= 1, got {self.num_classes}.")
        if self.null_class and self.num_classes is None:
            raise ValueError("UNet: null_class (the 'no class' label of classifier-free guidance) "
                             "needs a class-conditional model; set num_classes.")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"UNet: remat={self.remat!r} (config.model.remat); use one of "
                             f"{tuple(REMAT_POLICIES)}.")
        super().__post_init__()

    def _blocks(self) -> tuple[type[ResnetBlock], type[AttnBlock]]:
        """ResnetBlock and AttnBlock, rematerialised per `remat` (same parameter names)."""
        policy = REMAT_POLICIES[self.remat]
        if policy is None:
            return ResnetBlock, AttnBlock
        # static_argnums counts self: ResnetBlock.__call__(self, x, temb, train).
        return (nn.remat(ResnetBlock, policy=policy, static_argnums=(3,)),
                nn.remat(AttnBlock, policy=policy))

    def _check_inputs(self, x: jax.Array, t: jax.Array, y: jax.Array | None) -> None:
        if x.ndim != 4:
            raise ValueError(f"UNet: x must be NHWC [B, H, W, C], got shape {x.shape}.")
        b, height, width, _ = x.shape
        factor = 2 ** (len(self.ch_mult) - 1)
        if height % factor or width % factor:
            raise ValueError(
                f"UNet: image size {height}x{width} is not divisible by 2**(len(ch_mult)-1) = "
                f"{factor} ({len(self.ch_mult)} levels); change image_size or ch_mult.")
        reached = [height // 2**i for i in range(len(self.ch_mult))]
        missing = sorted(set(self.attn_resolutions) - set(reached))
        if missing:
            raise ValueError(
                f"UNet: attn_resolutions {missing} never occur; with image height {height} and "
                f"{len(self.ch_mult)} levels the resolutions are {reached}.")
        if jnp.shape(t) != (b,):
            raise ValueError(f"UNet: t must have shape [B] = [{b}], got {jnp.shape(t)}.")
        if self.num_classes is None and y is not None:
            raise ValueError("UNet: labels y were given but the model has num_classes=None; "
                             "set model.num_classes to train a class-conditional model.")
        if self.num_classes is not None and (y is None or jnp.shape(y) != (b,)):
            got = None if y is None else jnp.shape(y)
            raise ValueError(f"UNet: num_classes={self.num_classes} needs labels y of shape "
                             f"[{b}], got {got}.")

    @nn.compact
    def __call__(
        self, x: jax.Array, t: jax.Array, y: jax.Array | None = None, train: bool = False
    ) -> jax.Array:
        self._check_inputs(x, t, y)
        num_levels = len(self.ch_mult)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        resnet_block, attn_block = self._blocks()

        temb = _dense(self, 4 * self.ch, "temb_dense0")(timestep_embedding(t, self.ch))
        temb = _dense(self, 4 * self.ch, "temb_dense1")(nn.swish(temb))
        if self.num_classes is not None:
            rows = self.num_classes + int(self.null_class)  # row num_classes: ∅
            temb = temb + nn.Embed(rows, 4 * self.ch, name="class_embed", **kw)(y)

        hs = [_conv(self, self.ch, "conv_in")(x.astype(self.dtype))]
        for level in range(num_levels):
            for i in range(self.num_res_blocks):
                h = resnet_block(self.ch * self.ch_mult[level], self.dropout,
                          name=f"down_{level}_block_{i}", **kw)(hs[-1], temb, train)
                if h.shape[1] in self.attn_resolutions:
                    h = attn_block(name=f"down_{level}_attn_{i}", **kw)(h)
                hs.append(h)
            if level != num_levels - 1:
                hs.append(self._downsample(hs[-1], f"down_{level}_downsample"))

        h = hs[-1]
        h = resnet_block(h.shape[-1], self.dropout, name="mid_block_1", **kw)(h, temb, train)
        h = attn_block(name="mid_attn_1", **kw)(h)
        h = resnet_block(h.shape[-1], self.dropout, name="mid_block_2", **kw)(h, temb, train)

        for level in reversed(range(num_levels)):
            for i in range(self.num_res_blocks + 1):
                h = resnet_block(self.ch * self.ch_mult[level], self.dropout,
                          name=f"up_{level}_block_{i}", **kw)(
                    jnp.concatenate([h, hs.pop()], axis=-1), temb, train)
                if h.shape[1] in self.attn_resolutions:
                    h = attn_block(name=f"up_{level}_attn_{i}", **kw)(h)
            if level != 0:
                h = self._upsample(h, f"up_{level}_upsample")

        h = _group_norm(self, h, "norm_out", swish=True)
        # The output conv in (at least) float32: the prediction the loss and sampler use.
        out_dtype = jnp.promote_types(self.dtype, jnp.float32)
        return _conv(self, self.out_ch, "conv_out", init_scale=0.0, dtype=out_dtype)(h)

    def _downsample(self, x: jax.Array, name: str) -> jax.Array:
        """Halves H and W: 3×3 stride-2 conv with TF's "SAME" padding (0 before, 1 after), or
        a 2×2 average pool."""
        if self.resamp_with_conv:
            return _conv(self, x.shape[-1], name, strides=2, padding=((0, 1), (0, 1)))(x)
        return nn.avg_pool(x, (2, 2), strides=(2, 2))

    def _upsample(self, x: jax.Array, name: str) -> jax.Array:
        """Doubles H and W by nearest-neighbour repetition, then (optionally) a 3×3 conv."""
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        if self.resamp_with_conv:
            x = _conv(self, x.shape[-1], name)(x)
        return x


def unet_from_config(model_config: ml_collections.ConfigDict, num_channels: int) -> UNet:
    """The UNet of a `config.model` section with `num_channels` output channels (what they mean,
    ε, x_0 or v, is `config.diffusion.mean_type`). ``model.p_uncond`` > 0 (label dropout for
    classifier-free guidance) adds the "no class" embedding row."""
    from ddpm_jax import config_checks  # here: config_checks imports this module

    config_checks.check_model_fields(model_config)
    dtype_name = model_config.get("dtype", "float32")
    p_uncond = model_config.get("p_uncond", 0.0)
    return UNet(
        ch=model_config.ch,
        out_ch=num_channels,
        ch_mult=tuple(model_config.ch_mult),
        num_res_blocks=model_config.num_res_blocks,
        attn_resolutions=tuple(model_config.attn_resolutions),
        dropout=model_config.dropout,
        resamp_with_conv=model_config.get("resamp_with_conv", True),
        num_classes=model_config.get("num_classes", None),
        null_class=p_uncond > 0,
        remat=model_config.get("remat", "none"),
        dtype=jnp.dtype(dtype_name),
    )
