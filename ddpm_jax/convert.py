"""Import published DDPM weights from the diffusers `UNet2DModel` layout, and convert the FID
Inception-v3 weights to an .npz that hosts without torch can read.

    python -m ddpm_jax.convert --diffusers PATH --out DIR
    python -m ddpm_jax.convert --inception pt_inception-2015-12-05-6726825d.pth --out FILE.npz

PATH is a folder with `config.json` and `diffusion_pytorch_model.safetensors` (or `.bin`, which
needs torch), e.g. a download of `google/ddpm-cifar10-32`, or a saved pipeline holding `unet/`.
Only the layout of Ho et al. 2020 is accepted (Down/AttnDown blocks, single-head attention,
GroupNorm(32, 1e-6), time embedding [sin, cos] with freq_shift 1, asymmetric stride-2 conv);
any other layout, any shape mismatch and any missing or unused tensor is refused. A
`scheduler_config.json` next to the model (or in `../scheduler/`) sets the diffusion schedule.
DIR receives a params-only checkpoint that `python -m ddpm_jax.sample --workdir DIR` uses.

`convert_diffusers_state` is the pure conversion (NumPy state dict -> Flax params).

--inception reads pytorch-fid's FID Inception weights (needs torch) and writes the .npz that
`ddpm_jax.metrics.inception.load_variables` reads (see `convert_weights` there).
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from ddpm_jax import config_checks
from ddpm_jax.models.unet import NORM_EPS, NUM_GROUPS, unet_from_config

PyTree = Any

_SAFETENSORS = "diffusion_pytorch_model.safetensors"
_TORCH_BIN = "diffusion_pytorch_model.bin"

# Settings the DDPM layout needs: key -> (required value, UNet2DModel's default if absent).
_FIXED_SETTINGS = {
    "act_fn": ("silu", "silu"),
    "center_input_sample": (False, False),
    "time_embedding_type": ("positional", "positional"),
    "flip_sin_to_cos": (False, True),
    "freq_shift": (1, 0),
    "mid_block_type": ("UNetMidBlock2D", "UNetMidBlock2D"),
    "mid_block_scale_factor": (1, 1),
    "downsample_padding": (0, 1),
    "downsample_type": ("conv", "conv"),
    "upsample_type": ("conv", "conv"),
    "norm_num_groups": (NUM_GROUPS, 32),
    "norm_eps": (NORM_EPS, 1e-5),
    "resnet_time_scale_shift": ("default", "default"),
    "add_attention": (True, True),
    "class_embed_type": (None, None),
}
_DOWN_BLOCKS = {"DownBlock2D": False, "AttnDownBlock2D": True}  # type -> has attention
_UP_BLOCKS = {"UpBlock2D": False, "AttnUpBlock2D": True}

# Our top-level module names that diffusers names differently (per-level ones: _diffusers_module).
_TOP_MODULES = {
    "conv_in": "conv_in",
    "conv_out": "conv_out",
    "norm_out": "conv_norm_out",
    "temb_dense0": "time_embedding.linear_1",
    "temb_dense1": "time_embedding.linear_2",
    "class_embed": "class_embedding",
    "mid_block_1": "mid_block.resnets.0",
    "mid_attn_1": "mid_block.attentions.0",
    "mid_block_2": "mid_block.resnets.1",
}
_LEVEL_PARTS = {
    "block": "resnets.{}",
    "attn": "attentions.{}",
    "downsample": "downsamplers.0.conv",
    "upsample": "upsamplers.0.conv",
}
# Block-internal names; attention has a current and a pre-0.15 (deprecated AttentionBlock) name.
_SUBMODULES = {
    "temb_proj": ("time_emb_proj",),
    "nin_shortcut": ("conv_shortcut",),
    "norm": ("group_norm",),
    "q": ("to_q", "query"),
    "k": ("to_k", "key"),
    "v": ("to_v", "value"),
    "proj_out": ("to_out.0", "proj_attn"),
}
_LEAVES = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


# ----------------------------------------------------------------------------------------------
# The diffusers config -> our model config.
# ----------------------------------------------------------------------------------------------
def _refuse_layout(problems: list[str]) -> None:
    if problems:
        raise ValueError("Not the DDPM UNet layout, refusing to convert: " + "; ".join(problems))


def model_config_from_diffusers(
    cfg: Mapping[str, Any],
) -> tuple[ml_collections.ConfigDict, int, int]:
    """(config.model, image_size, num_channels) of a DDPM-layout UNet2DModel config.

    Raises ValueError listing every setting that is not the DDPM layout.
    """
    if cfg.get("_class_name") != "UNet2DModel":
        raise ValueError(f"Not a diffusers UNet2DModel config (_class_name="
                         f"{cfg.get('_class_name')!r}); only UNet2DModel can be converted.")
    problems = [
        f"{key}={cfg.get(key, default)!r} (need {need!r})"
        for key, (need, default) in _FIXED_SETTINGS.items()
        if cfg.get(key, default) != need
    ]
    channels = list(cfg.get("block_out_channels", ()))
    down, up = list(cfg.get("down_block_types", ())), list(cfg.get("up_block_types", ()))
    if not channels or len(down) != len(channels) or len(up) != len(channels):
        _refuse_layout(problems + [f"block_out_channels={channels}, down_block_types={down} and "
                                   f"up_block_types={up} must be non-empty and of equal length"])
    problems += [f"down block {b!r} (need one of {list(_DOWN_BLOCKS)})"
                 for b in down if b not in _DOWN_BLOCKS]
    problems += [f"up block {b!r} (need one of {list(_UP_BLOCKS)})"
                 for b in up if b not in _UP_BLOCKS]

    attn = [_DOWN_BLOCKS.get(b, False) for b in down]
    ch = channels[0]
    size = cfg.get("sample_size")
    size = size[0] if isinstance(size, (list, tuple)) and len(set(size)) == 1 else size
    in_ch, out_ch = cfg.get("in_channels", 3), cfg.get("out_channels", 3)
    head_dim = cfg.get("attention_head_dim", 8)
    attn_widths = [c for c, a in zip(channels, attn, strict=True) if a] + [channels[-1]]
    checks = [
        ([_UP_BLOCKS.get(b, False) for b in reversed(up)] == attn,
         f"up_block_types={up} must mirror down_block_types={down} (attention at the same "
         "resolutions on both paths)"),
        (all(c % ch == 0 for c in channels), f"block_out_channels={channels} must all be "
         f"multiples of the first ({ch})"),
        (isinstance(size, int), f"sample_size={cfg.get('sample_size')!r} must be one int "
         "(square images)"),
        (in_ch == out_ch, f"out_channels={out_ch} must equal in_channels={in_ch} (an ε model)"),
        (head_dim is None or all(w == head_dim for w in attn_widths),
         f"attention_head_dim={head_dim!r} must be None (single-head attention, as DDPM)"),
        (cfg.get("attn_norm_num_groups") in (None, NUM_GROUPS),
         f"attn_norm_num_groups={cfg.get('attn_norm_num_groups')!r} (need None or {NUM_GROUPS})"),
        (cfg.get("time_embedding_dim") in (None, 4 * ch),
         f"time_embedding_dim={cfg.get('time_embedding_dim')!r} (need None or {4 * ch})"),
        (cfg.get("layers_per_block", 2) >= 1, "layers_per_block must be >= 1"),
    ]
    _refuse_layout(problems + [msg for ok, msg in checks if not ok])

    model = ml_collections.ConfigDict()
    model.ch = ch
    model.ch_mult = tuple(c // ch for c in channels)
    model.num_res_blocks = cfg.get("layers_per_block", 2)
    model.attn_resolutions = tuple(size // 2**i for i, a in enumerate(attn) if a)
    model.dropout = float(cfg.get("dropout", 0.0))
    model.resamp_with_conv = True
    model.num_classes = cfg.get("num_class_embeds")
    model.dtype = "float32"
    return model, size, in_ch


# ----------------------------------------------------------------------------------------------
# Tensors.
# ----------------------------------------------------------------------------------------------
def _diffusers_module(name: str, num_levels: int) -> str:
    """diffusers module path of one of our top-level modules (up level l is up_blocks[L-1-l])."""
    if name in _TOP_MODULES:
        return _TOP_MODULES[name]
    m = re.fullmatch(r"(down|up)_(\d+)_(block|attn|downsample|upsample)(?:_(\d+))?", name)
    if m is None:
        raise ValueError(f"No diffusers counterpart for parameter module {name!r}.")
    path, level, kind, index = m.groups()
    block = int(level) if path == "down" else num_levels - 1 - int(level)
    return f"{path}_blocks.{block}.{_LEVEL_PARTS[kind].format(index)}"


def _diffusers_keys(path: tuple[str, ...], num_levels: int) -> list[str]:
    """Candidate diffusers state-dict keys of our parameter `path`, e.g. ('up_1_attn_0', 'q',
    'kernel') -> ['up_blocks.2.attentions.0.to_q.weight', 'up_blocks.2.attentions.0.query.weight']
    when there are 4 levels."""
    module, *inner, leaf = path
    prefix = _diffusers_module(module, num_levels)
    subs = [_SUBMODULES.get(s, (s,)) for s in inner]  # at most one level of nesting
    names = [f"{prefix}.{sub}" for sub in subs[0]] if subs else [prefix]
    return [f"{n}.{_LEAVES[leaf]}" for n in names]


def _to_flax(w: np.ndarray, target_ndim: int, leaf: str) -> np.ndarray:
    """A torch tensor in our layout: conv OIHW -> HWIO; Linear (or 1×1 conv) [O, I] -> [I, O]."""
    if leaf != "kernel":
        return w
    if target_ndim == 4 and w.ndim == 4:
        return w.transpose(2, 3, 1, 0)
    if target_ndim == 2 and w.ndim in (2, 4) and w.shape[2:] in ((), (1, 1)):
        return w.reshape(w.shape[:2]).T
    return w  # left as is: reported as a shape mismatch


def convert_diffusers_state(
    state_dict: Mapping[str, Any], diffusers_config: Mapping[str, Any]
) -> tuple[PyTree, ml_collections.ConfigDict]:
    """(Flax params, config.model) of a DDPM-layout diffusers UNet2DModel.

    `state_dict` maps diffusers names to arrays (NumPy or anything np.asarray accepts). Every one
    of our parameters must come from exactly one tensor of the right shape and every tensor must
    be used; otherwise ValueError lists all the problems.
    """
    model_config, image_size, num_channels = model_config_from_diffusers(diffusers_config)
    unet = unet_from_config(model_config, num_channels)
    y = None if model_config.num_classes is None else jnp.zeros((1,), jnp.int32)
    shapes = jax.eval_shape(
        lambda: unet.init(jax.random.key(0), jnp.zeros((1, image_size, image_size, num_channels)),
                          jnp.zeros((1,), jnp.int32), y)
    )["params"]
    num_levels = len(model_config.ch_mult)

    unused = dict(state_dict)
    flat, missing, ambiguous, mismatched = {}, [], [], []
    for path, target in traverse_util.flatten_dict(shapes).items():
        keys = _diffusers_keys(path, num_levels)
        found = [k for k in keys if k in unused]
        if not found:
            missing.append(f"{'/'.join(path)} {target.shape}: no {' or '.join(keys)}")
            continue
        if len(found) > 1:
            ambiguous.append(f"{'/'.join(path)} from {' or '.join(found)}?")
            for k in found:
                unused.pop(k)
            continue
        w = np.asarray(unused.pop(found[0]), dtype=np.float32)
        value = _to_flax(w, len(target.shape), path[-1])
        if value.shape != target.shape:
            mismatched.append(f"{found[0]} {w.shape} -> {'/'.join(path)} needs {target.shape}")
        flat[path] = value.astype(target.dtype, copy=False)
    problems = (
        [f"shape mismatch: {m}" for m in mismatched]
        + [f"missing tensor for {m}" for m in missing]
        + [f"ambiguous (both names present): {m}" for m in ambiguous]
        + [f"unused tensor: {k} {np.shape(unused[k])}" for k in sorted(unused)]
    )
    if problems:
        raise ValueError(f"The state dict does not match the DDPM UNet of this config "
                         f"({len(problems)} problems), refusing to convert: "
                         + "; ".join(problems))
    return traverse_util.unflatten_dict(flat), model_config


# ----------------------------------------------------------------------------------------------
# Files and the full run config.
# ----------------------------------------------------------------------------------------------
def _read(file: Path, what: str, read: Callable[[Path], Any]) -> Any:
    """``read(file)``; a damaged or foreign file is one ValueError line naming it."""
    try:
        return read(file)
    except Exception as e:  # json, safetensors and torch raise many types here
        raise ValueError(f"{file} is not a readable {what}: {type(e).__name__}: "
                         f"{' '.join(str(e).split())}") from None


def load_diffusers_model(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any], Path]:
    """(state dict as NumPy, config.json, model folder) of a saved UNet2DModel or pipeline, read
    without pickle (safetensors, or torch's weights-only loader)."""
    path = Path(path)
    if not (path / "config.json").exists() and (path / "unet" / "config.json").exists():
        path = path / "unet"
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"No config.json in {path}: pass the folder of a saved "
                                "diffusers UNet2DModel (or of a pipeline holding unet/).")
    config = _read(path / "config.json", "diffusers config (JSON)",
                   lambda f: json.loads(f.read_text()))
    if not isinstance(config, dict):
        raise ValueError(f"{path / 'config.json'} holds a {type(config).__name__}, not a "
                         "diffusers config (a JSON object).")
    if (path / _SAFETENSORS).exists():
        from safetensors.numpy import load_file

        return _read(path / _SAFETENSORS, "safetensors file", load_file), config, path
    if (path / _TORCH_BIN).exists():
        try:
            import torch
        except ImportError as e:
            raise ImportError(f"{path / _TORCH_BIN} is a PyTorch pickle and reading it needs torch "
                              "(pip install torch), or convert it to safetensors first.") from e
        state = _read(path / _TORCH_BIN, "PyTorch state dict", lambda f: torch.load(
            f, map_location="cpu", weights_only=True))
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor)
                                                  for v in state.values()):
            raise ValueError(f"{path / _TORCH_BIN} holds a {type(state).__name__}, not a state "
                             "dict of tensors.")
        return {k: v.float().numpy() for k, v in state.items()}, config, path
    raise FileNotFoundError(f"Neither {_SAFETENSORS} nor {_TORCH_BIN} in {path}.")


_VAR_TYPES = {"fixed_small": "fixedsmall", "fixed_small_log": "fixedsmall",
              "fixed_large": "fixedlarge", "fixed_large_log": "fixedlarge"}


def settings_from_scheduler(sched: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """{"diffusion": ..., "sample": ...} config fields of a diffusers DDPMScheduler config: the
    schedule the model was trained with, what it predicts, the sampler variance (variance_type:
    fixed_small -> σ_t² = β̃_t, the paper's 256x256 models; fixed_large -> β_t, CIFAR-10; the
    _log variants compute the same variance) and whether x_0 is clipped (clip_sample).
    Anything else is refused rather than sampled differently."""
    schedule = {"linear": "linear", "squaredcos_cap_v2": "cosine"}.get(sched.get("beta_schedule"))
    mean_type = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}.get(
        sched.get("prediction_type", "epsilon"))
    var_type = _VAR_TYPES.get(sched.get("variance_type", "fixed_small"))
    clip_range = float(sched.get("clip_sample_range", 1.0))
    if (sched.get("trained_betas") is not None or schedule is None or mean_type is None
            or var_type is None or clip_range != 1.0 or sched.get("thresholding")):
        raise ValueError(
            f"Unsupported scheduler: beta_schedule={sched.get('beta_schedule')!r} (need 'linear' "
            f"or 'squaredcos_cap_v2'), prediction_type={sched.get('prediction_type')!r}, "
            f"variance_type={sched.get('variance_type')!r} (need one of {sorted(_VAR_TYPES)}), "
            f"clip_sample_range={clip_range} (need 1.0), thresholding="
            f"{bool(sched.get('thresholding'))} (need False), trained_betas "
            f"{'set' if sched.get('trained_betas') is not None else 'unset'} (need unset).")
    diffusion = dict(schedule=schedule, num_timesteps=int(sched.get("num_train_timesteps", 1000)),
                     beta_start=float(sched.get("beta_start", 1e-4)),
                     beta_end=float(sched.get("beta_end", 0.02)), mean_type=mean_type,
                     var_type=var_type)
    sample = {"clip_denoised": bool(sched.get("clip_sample", True))}
    return {"diffusion": diffusion, "sample": sample}


def _base_config() -> ml_collections.ConfigDict:
    """The shipped CIFAR-10 config: the fields a converted model's config does not set."""
    from ddpm_jax.configs import cifar10

    return cifar10.get_config()


def full_config(
    model_config: ml_collections.ConfigDict, image_size: int, num_channels: int,
    settings: Mapping[str, Mapping[str, Any]] | None = None,
) -> ml_collections.ConfigDict:
    """A complete run config around a converted model (other fields from configs/cifar10.py);
    ``settings`` ({"diffusion": ..., "sample": ...}) override the sections they name."""
    config = _base_config()
    config.model = model_config
    config.data.image_size = image_size
    config.data.num_channels = num_channels
    config.data.class_conditional = model_config.num_classes is not None
    for section, fields in (settings or {}).items():
        config[section].update(fields)
    return config


def _scheduler_config(model_dir: Path) -> dict[str, Any] | None:
    for candidate in (model_dir / "scheduler_config.json",
                      model_dir.parent / "scheduler" / "scheduler_config.json"):
        if candidate.exists():
            return json.loads(candidate.read_text())
    return None


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ddpm_jax.convert",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--diffusers", help="folder of a saved UNet2DModel")
    source.add_argument("--inception", help="pytorch-fid's FID Inception-v3 weights (.pth)")
    parser.add_argument("--out", required=True, help="new workdir for the converted checkpoint "
                        "(--diffusers), or the .npz file to write (--inception)")
    args = parser.parse_args(argv)

    if args.inception is not None:
        from ddpm_jax.metrics import inception

        try:
            out = inception.convert_weights(args.inception, args.out)
        except (ValueError, OSError, ImportError) as e:
            parser.exit(2, f"{parser.prog}: error: {e}\n")
        print(f"Converted the FID Inception-v3 weights {args.inception} to {out}.")
        return

    from ddpm_jax import checkpointing

    try:
        state, diffusers_config, model_dir = load_diffusers_model(args.diffusers)
        params, model_config = convert_diffusers_state(state, diffusers_config)
        _, image_size, num_channels = model_config_from_diffusers(diffusers_config)
        sched = _scheduler_config(model_dir)
        settings = None if sched is None else settings_from_scheduler(sched)
        config = full_config(model_config, image_size, num_channels, settings)
        config_checks.check_config(config, "sample", fix="")  # what sample and evaluate will read
        step_dir = checkpointing.save_params_checkpoint(args.out, params, config, step=0)
    except (ValueError, OSError, ImportError) as e:  # the user's input: a message, no traceback
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    count = sum(p.size for p in jax.tree.leaves(params))
    print(f"Converted {len(state)} tensors ({count:,} parameters) from {model_dir} to {step_dir}"
          f" (schedule: {'from ' + str(model_dir) if sched else 'config default'}).")


if __name__ == "__main__":
    main()
