"""The diffusers counterpart of a ddpm_jax config: UNet2DModel's and DDPMScheduler's arguments,
the inverse of ``ddpm_jax.convert``'s mapping (diffusers -> ddpm_jax), each checked by converting
it back. Used by diffusers_side_by_side.py; needs neither torch nor diffusers."""

from __future__ import annotations

from typing import Any

import ml_collections

from ddpm_jax import convert

_STRUCTURE = ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout",
              "resamp_with_conv", "num_classes")


def unet_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """UNet2DModel's arguments for config.model: ``convert.model_config_from_diffusers`` inverted,
    and checked by applying it (ValueError for a model diffusers' blocks cannot express)."""
    model, size = config.model, config.data.image_size
    if model.get("num_classes") is not None:
        raise ValueError(f"config.model.num_classes={model.num_classes}: only unconditional "
                         "models (the paper's) have a counterpart here; unset it "
                         "(--config.model.num_classes=None).")
    attn = [size // 2**level in model.attn_resolutions for level in range(len(model.ch_mult))]
    unet = {key: need for key, (need, _) in convert._FIXED_SETTINGS.items()}
    unet.update(
        _class_name="UNet2DModel", sample_size=size, in_channels=config.data.num_channels,
        out_channels=config.data.num_channels, block_out_channels=[model.ch * m
                                                                   for m in model.ch_mult],
        layers_per_block=model.num_res_blocks, attention_head_dim=None, dropout=model.dropout,
        down_block_types=["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        up_block_types=["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
    )
    back, _, _ = convert.model_config_from_diffusers(unet)
    ours = {k: model.get(k, True if k == "resamp_with_conv" else None) for k in _STRUCTURE}
    theirs = {k: back[k] for k in _STRUCTURE}
    ours["ch_mult"], ours["attn_resolutions"] = (tuple(ours["ch_mult"]),
                                                 tuple(ours["attn_resolutions"]))
    if ours != theirs:
        raise ValueError(f"config.model {ours} has no UNet2DModel counterpart (the nearest is "
                         f"{theirs}).")
    return {k: v for k, v in unet.items() if not k.startswith("_")}


_PREDICTIONS = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
_VARIANCES = {"fixedlarge": "fixed_large", "fixedsmall": "fixed_small"}


def scheduler_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """DDPMScheduler's arguments for config.diffusion and config.sample: the inverse of
    ``convert.settings_from_scheduler``, checked by applying it."""
    diff = config.diffusion
    beta_schedule = {"linear": "linear", "cosine": "squaredcos_cap_v2"}[diff.schedule]
    sched = dict(num_train_timesteps=diff.num_timesteps, beta_start=diff.beta_start,
                 beta_end=diff.beta_end, beta_schedule=beta_schedule,
                 prediction_type=_PREDICTIONS[diff.mean_type],
                 variance_type=_VARIANCES[diff.var_type],
                 clip_sample=bool(config.sample.clip_denoised))
    back = convert.settings_from_scheduler(sched)
    want = {"diffusion": {k: diff[k] for k in back["diffusion"]},
            "sample": {"clip_denoised": bool(config.sample.clip_denoised)}}
    if back != want:
        raise ValueError(f"No DDPMScheduler for {want} (the nearest is {back}).")
    return sched
