"""Import of diffusers UNet2DModel weights, and parity of our UNet with diffusers' (PyTorch).

The `parity` tests need the [parity] extra (torch, diffusers) and are skipped without it; the
layout checks on config dicts run everywhere.
"""

import json

import jax
import numpy as np
import pytest
from flax import traverse_util

from ddpm_jax import convert
from ddpm_jax.models import unet_from_config

# config.json of google/ddpm-cifar10-32, the published CIFAR-10 model of Ho et al. 2020.
CIFAR10_DIFFUSERS = {
    "_class_name": "UNet2DModel",
    "_diffusers_version": "0.0.4",
    "act_fn": "silu",
    "attention_head_dim": None,
    "block_out_channels": [128, 256, 256, 256],
    "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "in_channels": 3,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-06,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 32,
    "time_embedding_type": "positional",
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}
# The google/ddpm-{church,bedroom,cat,celebahq}-256 layout: 6 levels, attention at 16×16.
LSUN256_DIFFUSERS = dict(
    CIFAR10_DIFFUSERS,
    sample_size=256,
    block_out_channels=[128, 128, 256, 256, 512, 512],
    down_block_types=["DownBlock2D"] * 4 + ["AttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "AttnUpBlock2D"] + ["UpBlock2D"] * 4,
)
# A small class-conditional model of the same family: 2 levels, attention at 8×8.
SMALL_DIFFUSERS = dict(
    CIFAR10_DIFFUSERS,
    sample_size=16,
    block_out_channels=[32, 64],
    down_block_types=["DownBlock2D", "AttnDownBlock2D"],
    up_block_types=["AttnUpBlock2D", "UpBlock2D"],
    layers_per_block=1,
    num_class_embeds=10,
)
_DELETE = object()


# ----------------------------------------------------------------------------------------------
# Layout checks (no torch needed).
# ----------------------------------------------------------------------------------------------
def test_cifar10_config_is_the_paper_model():
    model, image_size, channels = convert.model_config_from_diffusers(CIFAR10_DIFFUSERS)
    assert (image_size, channels) == (32, 3)
    assert (model.ch, model.ch_mult, model.num_res_blocks, model.attn_resolutions) == (
        128, (1, 2, 2, 2), 2, (16,))
    assert model.resamp_with_conv and model.num_classes is None
    model, image_size, _ = convert.model_config_from_diffusers(LSUN256_DIFFUSERS)
    assert (model.ch_mult, model.attn_resolutions, image_size) == ((1, 1, 2, 2, 4, 4), (16,), 256)


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"_class_name": "UNet2DConditionModel"}, "only UNet2DModel"),
        ({"freq_shift": 0}, r"freq_shift=0 \(need 1\)"),
        ({"flip_sin_to_cos": _DELETE}, r"flip_sin_to_cos=True \(need False\)"),  # diffusers default
        ({"downsample_padding": 1}, r"downsample_padding=1 \(need 0\)"),
        ({"norm_eps": 1e-5}, "norm_eps"),
        ({"act_fn": "gelu"}, "act_fn"),
        ({"down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D",
                               "DownBlock2D"]}, "CrossAttnDownBlock2D"),
        ({"up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"]},
         "must mirror"),
        ({"attention_head_dim": 8}, "single-head"),
        ({"out_channels": 6}, "out_channels=6 must equal in_channels=3"),
        ({"block_out_channels": [128, 192, 256, 256]}, "multiples of the first"),
        ({"sample_size": [32, 64]}, "square"),
        ({"block_out_channels": [128, 256, 256]}, "equal length"),
    ],
)
def test_other_layouts_are_refused(changes, match):
    cfg = dict(CIFAR10_DIFFUSERS)
    for key, value in changes.items():
        if value is _DELETE:
            del cfg[key]
        else:
            cfg[key] = value
    with pytest.raises(ValueError, match=match):
        convert.convert_diffusers_state({}, cfg)


def test_scheduler_config_sets_the_diffusion_and_the_sampler_variance():
    sched = {"beta_schedule": "linear", "beta_start": 2e-4, "beta_end": 0.03,
             "num_train_timesteps": 500, "trained_betas": None}
    assert convert.settings_from_scheduler(sched) == dict(
        diffusion=dict(schedule="linear", num_timesteps=500, beta_start=2e-4, beta_end=0.03,
                       mean_type="eps", var_type="fixedsmall"),  # diffusers' default variance
        sample=dict(clip_denoised=True))
    # The published models: google/ddpm-cifar10-32 samples with β_t, the 256x256 ones with β̃_t.
    cifar = convert.settings_from_scheduler(dict(sched, variance_type="fixed_large"))
    assert cifar["diffusion"]["var_type"] == "fixedlarge"
    church = convert.settings_from_scheduler(dict(sched, variance_type="fixed_small",
                                                  clip_sample=False))
    assert church["diffusion"]["var_type"] == "fixedsmall"
    assert church["sample"] == dict(clip_denoised=False)
    cosine = convert.settings_from_scheduler(
        dict(sched, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction"))
    assert (cosine["diffusion"]["schedule"], cosine["diffusion"]["mean_type"]) == ("cosine", "v")
    for bad in ({"beta_schedule": "scaled_linear"}, {"trained_betas": [0.1, 0.2]},
                {"prediction_type": "flow"}, {"variance_type": "learned_range"},
                {"clip_sample_range": 2.0}, {"thresholding": True}):
        with pytest.raises(ValueError, match="Unsupported scheduler"):
            convert.settings_from_scheduler(dict(sched, **bad))


def test_full_config_describes_the_converted_model():
    model, image_size, channels = convert.model_config_from_diffusers(SMALL_DIFFUSERS)
    config = convert.full_config(model, image_size, channels,
                                 {"diffusion": {"num_timesteps": 500, "var_type": "fixedsmall"},
                                  "sample": {"clip_denoised": False}})
    assert config.model.num_classes == 10 and config.data.class_conditional
    assert (config.data.image_size, config.data.num_channels) == (16, 3)
    assert config.diffusion.num_timesteps == 500 and config.diffusion.schedule == "linear"
    assert config.diffusion.var_type == "fixedsmall" and not config.sample.clip_denoised
    assert {"seed", "data", "model", "diffusion", "sample"} <= set(config)


# ----------------------------------------------------------------------------------------------
# Against diffusers (the [parity] extra).
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def torch_diffusers():
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    return torch, diffusers.UNet2DModel


def _random_diffusers_unet(torch_diffusers, config, seed=0):
    """A diffusers UNet2DModel (eval, float32) whose every weight, GroupNorm affine and bias
    included, is its init plus 0.02·N(0, 1); and its state dict as NumPy."""
    torch, unet2d = torch_diffusers
    torch.manual_seed(seed)
    model = unet2d(**{k: v for k, v in config.items() if not k.startswith("_")}).eval().float()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model, {k: v.numpy() for k, v in model.state_dict().items()}


def _torch_forward(torch, model, x, t, y=None):
    """Runs the NCHW torch model on NHWC NumPy inputs."""
    with torch.no_grad():
        out = model(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t).long(),
                    class_labels=None if y is None else torch.from_numpy(y).long()).sample
    return out.numpy().transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def small(torch_diffusers):
    return _random_diffusers_unet(torch_diffusers, SMALL_DIFFUSERS, seed=1)


@pytest.mark.parity
def test_cifar10_model_equals_diffusers(torch_diffusers):
    """The published CIFAR-10 architecture, random weights: same parameters, same ε to 1e-4."""
    torch, _ = torch_diffusers
    model, state = _random_diffusers_unet(torch_diffusers, CIFAR10_DIFFUSERS)
    params, model_config = convert.convert_diffusers_state(state, CIFAR10_DIFFUSERS)
    count = sum(p.size for p in jax.tree.leaves(params))
    assert count == sum(p.numel() for p in model.parameters()) == 35_746_307

    rng = np.random.RandomState(0)
    x = rng.randn(4, 32, 32, 3).astype(np.float32)
    t = np.array([0, 1, 500, 999], np.int32)
    unet = unet_from_config(model_config, num_channels=3)
    ours = np.asarray(jax.jit(unet.apply)({"params": params}, x, t))
    theirs = _torch_forward(torch, model, x, t)
    assert np.abs(theirs).mean() > 0.1  # a non-trivial output
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)


@pytest.mark.parity
def test_class_conditional_model_equals_diffusers(torch_diffusers, small):
    torch, _ = torch_diffusers
    model, state = small
    params, model_config = convert.convert_diffusers_state(state, SMALL_DIFFUSERS)
    rng = np.random.RandomState(1)
    x = rng.randn(3, 16, 16, 3).astype(np.float32)
    t, y = np.array([0, 321, 999], np.int32), np.array([0, 4, 9], np.int32)
    unet = unet_from_config(model_config, num_channels=3)
    ours = np.asarray(jax.jit(unet.apply)({"params": params}, x, t, y))
    np.testing.assert_allclose(ours, _torch_forward(torch, model, x, t, y), rtol=0, atol=1e-4)


@pytest.mark.parity
def test_256_model_converts_shape_for_shape(torch_diffusers):
    """The 256×256 layout (114M): every diffusers tensor lands on one of ours, shapes equal."""
    torch, unet2d = torch_diffusers
    with torch.device("meta"):  # shapes only: no memory, no init
        model = unet2d(**{k: v for k, v in LSUN256_DIFFUSERS.items() if not k.startswith("_")})
    zero = np.zeros((), np.float32)
    state = {k: np.broadcast_to(zero, tuple(v.shape)) for k, v in model.state_dict().items()}
    params, _ = convert.convert_diffusers_state(state, LSUN256_DIFFUSERS)
    count = sum(p.size for p in jax.tree.leaves(params))
    assert count == sum(p.numel() for p in model.parameters()) == 113_673_219


def _flat(tree):
    return traverse_util.flatten_dict(tree, sep="/")


@pytest.mark.parity
def test_deprecated_attention_names_convert_the_same(small):
    """Older checkpoints (e.g. the Hub's DDPM ones) name attention query/key/value/proj_attn."""
    _, state = small
    old_names = {"to_q.": "query.", "to_k.": "key.", "to_v.": "value.", "to_out.0.": "proj_attn."}
    renamed = {}
    for key, value in state.items():
        for new, old in old_names.items():
            key = key.replace(new, old)
        renamed[key] = value
    assert renamed.keys() != state.keys()
    want, _ = convert.convert_diffusers_state(state, SMALL_DIFFUSERS)
    got, _ = convert.convert_diffusers_state(renamed, SMALL_DIFFUSERS)
    jax.tree.map(np.testing.assert_array_equal, got, want)


@pytest.mark.parity
def test_state_dict_problems_are_refused(small):
    _, state = small
    broken = dict(state)
    del broken["mid_block.resnets.1.conv2.bias"]
    broken["up_blocks.0.resnets.0.conv1.weight"] = np.zeros((64, 128, 3, 1), np.float32)
    broken["extra.weight"] = np.zeros(3, np.float32)
    broken["down_blocks.1.attentions.0.query.weight"] = state[
        "down_blocks.1.attentions.0.to_q.weight"]
    with pytest.raises(ValueError, match="4 problems") as err:
        convert.convert_diffusers_state(broken, SMALL_DIFFUSERS)
    message = str(err.value)
    assert "up_blocks.0.resnets.0.conv1.weight (64, 128, 3, 1)" in message
    assert "missing tensor for mid_block_2/conv2/bias" in message
    assert ("down_1_attn_0/q/kernel from down_blocks.1.attentions.0.to_q.weight or "
            "down_blocks.1.attentions.0.query.weight?") in message
    assert "unused tensor: extra.weight (3,)" in message


@pytest.mark.parity
def test_bin_files_and_pipeline_folders_load(torch_diffusers, small, tmp_path):
    model, state = small
    model.save_pretrained(tmp_path / "unet", safe_serialization=False)
    loaded, config, folder = convert.load_diffusers_model(tmp_path)  # a pipeline's root
    assert folder == tmp_path / "unet" and config["num_class_embeds"] == 10
    assert loaded.keys() == state.keys()
    jax.tree.map(np.testing.assert_array_equal, loaded, state)


@pytest.mark.parity
def test_command_line_writes_a_sampling_checkpoint(small, tmp_path):
    from ddpm_jax import checkpointing

    model, state = small
    model.save_pretrained(tmp_path / "model", safe_serialization=True)
    (tmp_path / "model" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "DDPMScheduler", "beta_schedule": "linear", "beta_start": 2e-4,
         "beta_end": 0.03, "num_train_timesteps": 500, "trained_betas": None}))
    convert.main(["--diffusers", str(tmp_path / "model"), "--out", str(tmp_path / "run")])

    ema, config, step = checkpointing.load_ema_params(tmp_path / "run")
    want, model_config = convert.convert_diffusers_state(state, SMALL_DIFFUSERS)
    assert step == 0 and _flat(ema).keys() == _flat(want).keys()
    jax.tree.map(np.testing.assert_array_equal, ema, want)
    assert config.model.to_dict() == model_config.to_dict()
    assert (config.data.image_size, config.data.num_channels) == (16, 3)
    assert (config.diffusion.num_timesteps, config.diffusion.beta_end) == (500, 0.03)
