"""The compile report (ddpm_jax/program_costs.py, benchmarks/compile_report.py) on the 8 fake CPU
devices: what the real programs of a tiny config compile to, the HLO collective parser on known
text, and the analytic UNet FLOP count against a count by hand."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import jax
import ml_collections
import numpy as np
import pytest

from ddpm_jax import program_costs, training
from ddpm_jax.configs import tiny
from ddpm_jax.models import unet_from_config

REPO = Path(__file__).resolve().parent.parent


def guided_tiny_config() -> ml_collections.ConfigDict:
    """configs/tiny.py, class-conditional with label dropout (so it has a guided sampler)."""
    config = tiny.get_config()
    config.model.num_classes = 10
    config.model.p_uncond = 0.1
    config.data.class_conditional = True
    return config


@pytest.fixture(scope="module")
def tiny_report() -> dict[str, dict]:
    assert jax.device_count() == 8
    results = program_costs.report(guided_tiny_config(), jax.devices(),
                                   ["train", "sample_guided"], sample_batch=16)
    return {r["program"]: r for r in results}


def test_the_train_step_has_no_all_gather_and_fits(tiny_report):
    train = tiny_report["train"]
    assert train["collectives"]["counts"]["all-gather"] == 0
    assert train["collectives"]["counts"]["all-reduce"] >= 1  # the gradient's mean
    config = guided_tiny_config()
    model = unet_from_config(config.model, config.data.num_channels)
    tx = training.make_optimizer(config.optim)
    state = jax.eval_shape(lambda key: training.create_train_state(config, model, tx, key),
                           jax.random.key(0))
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    memory = train["memory"]
    assert state_bytes <= memory["argument_bytes"] < state_bytes + 2**20  # + a batch slice
    assert memory["argument_bytes"] + memory["temp_bytes"] < 32 * 2**20


def test_compiled_flops_per_image_are_close_to_the_analytic_count(tiny_report):
    for name in ("train", "sample_guided"):
        result = tiny_report[name]
        ratio = result["flops_per_image"] / result["analytic_flops_per_image"]
        assert 0.9 < ratio < 1.2, (name, ratio)  # the analytic count leaves out norms and adds


def test_the_sampler_chain_is_counted_per_network_call(tiny_report):
    guided = tiny_report["sample_guided"]
    loop = program_costs.main_loop_collectives(guided)
    assert loop["trip_count"] == tiny.get_config().sample.num_steps == guided["calls_per_dispatch"]
    assert guided["counted_calls"] == 1
    assert guided["images_per_device"] == 2


def test_the_guided_sampler_loop_body_has_no_collectives(tiny_report):
    loop = program_costs.main_loop_collectives(tiny_report["sample_guided"])
    assert not any(loop["counts"].values()), loop["counts"]


def test_analytic_unet_flops_match_a_count_by_hand():
    config = ml_collections.ConfigDict(dict(
        ch=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(16,), resamp_with_conv=True))
    n = 16 * 16  # one level: 16x16 throughout, 1 input channel

    def conv(c_in, c_out):
        return 2 * 9 * c_in * c_out * n

    temb = 2 * 32 * 128 + 2 * 128 * 128
    block_32 = conv(32, 32) + 2 * 128 * 32 + conv(32, 32)
    block_64_to_32 = conv(64, 32) + 2 * 128 * 32 + conv(32, 32) + 2 * 64 * 32 * n  # + nin
    attention = 4 * 2 * n * 32 * 32 + 2 * (2 * n * n * 32)
    expected = (temb + conv(1, 32)  # conv_in
                + block_32 + attention  # down: 1 block + its attention, no downsample
                + block_32 + attention + block_32  # middle
                + 2 * (block_64_to_32 + attention)  # up: 2 blocks on [h; skip]
                + conv(32, 1))  # conv_out
    assert program_costs.unet_forward_flops(config, 16, 1) == expected


def test_analytic_flops_of_a_two_level_unet_match_xlas_count_of_its_forward():
    config = tiny.get_config()
    config.model.ch_mult = (1, 2)
    config.model.attn_resolutions = (8,)
    model = unet_from_config(config.model, 1)
    x, t = jax.ShapeDtypeStruct((1, 16, 16, 1), np.float32), jax.ShapeDtypeStruct((1,), np.int32)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, 16, 16, 1)),
                                               np.zeros((1,), np.int32)))
    cost = jax.jit(model.apply).lower(params, x, t).compile().cost_analysis()
    xla = (cost[0] if isinstance(cost, list) else cost)["flops"]
    analytic = program_costs.unet_forward_flops(config.model, 16, 1, count_padding=False)
    assert 1.0 <= xla / analytic < 1.05  # XLA also counts norms, activations and adds
    padded = program_costs.unet_forward_flops(config.model, 16, 1)
    assert 1.08 < padded / analytic < 1.2  # taps on the padding: 9/8 at 16x16, 9/7.6 at 8x8


_HLO = """\
HloModule test, entry_computation_layout={(f32[8]{0})->f32[8]{0}}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %add.1 = f32[] add(f32[] %a, f32[] %b)
}

%inner_body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]{0}) parameter(0)
  %x = f32[8]{0} get-tuple-element(%p), index=1
  %cp = f32[8]{0} collective-permute(f32[8]{0} %x), source_target_pairs={{0,1},{1,0}}
  ROOT %t = (s32[], f32[8]{0}) tuple(s32[] %i, f32[8]{0} %cp)
}

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]{0}) parameter(0)
  %x = f32[8]{0} get-tuple-element(%p), index=1
  %conv = f32[8]{0} convolution(f32[8]{0} %x, f32[3]{0} %k), dim_labels=b0f_0io->b0f
  %ags = (f32[2]{0}, f32[8]{0}) all-gather-start(f32[2]{0} %y), dimensions={0}
  %agd = f32[8]{0} all-gather-done((f32[2]{0}, f32[8]{0}) %ags)
  %w = (s32[], f32[8]{0}) while((s32[], f32[8]{0}) %p), condition=%cond, body=%inner_body
  ROOT %t = (s32[], f32[8]{0}) tuple(s32[] %i, f32[8]{0} %agd)
}

%cond (p: (s32[], f32[8])) -> pred[] {
  %p = (s32[], f32[8]{0}) parameter(0)
  %n = s32[] constant(1000)
  ROOT %lt = pred[] compare(s32[] %i, s32[] %n), direction=LT
}

%rng (p: (s32[], u32[4])) -> (s32[], u32[4]) {
  ROOT %p = (s32[], u32[4]{0}) parameter(0)
}

ENTRY %main (x: f32[8]) -> f32[8] {
  %x = f32[8]{0} parameter(0)
  %ar = bf16[4,8]{1,0} all-reduce(bf16[4,8]{1,0} %z), replica_groups={}, to_apply=%add
  %r = (s32[], u32[4]) while(%s), body=%rng, backend_config={"known_trip_count":{"n":"5"}}
  %w = (s32[], f32[8]) while(%t), condition=%cond, body=%body
  ROOT %out = f32[8]{0} get-tuple-element(%w), index=1
}
"""


def test_collectives_are_counted_once_per_op_with_loop_bodies_apart():
    found = program_costs.collectives(_HLO)
    assert found["counts"] == {"all-gather": 1, "all-reduce": 1, "reduce-scatter": 0,
                               "all-to-all": 0, "collective-permute": 1}
    assert found["bytes"]["all-reduce"] == 4 * 8 * 2  # bf16[4,8]
    assert found["bytes"]["all-gather"] == 8 * 4  # the -done's result, f32[8]
    [loop] = found["loops"]  # the rng-like loop holds neither network ops nor collectives
    assert loop["trip_count"] == 1000  # no known_trip_count (as from XLA:TPU): i < 1000
    assert loop["network_ops"] == 1
    assert loop["counts"] == {"all-gather": 1, "all-reduce": 0, "reduce-scatter": 0,
                              "all-to-all": 0, "collective-permute": 1}  # nested loop included


_TPU_HLO = """\
HloModule test, is_scheduled=true

%fused (a: f32[8,128], b: bf16[4,32]) -> bf16[4,32] {
  %a = f32[8,128]{1,0:T(8,128)S(1)} parameter(0)
  %b = bf16[4,32]{1,0:T(8,128)(2,1)} parameter(1)
  %big = f32[1000,1000]{1,0} broadcast(%a), dimensions={}
  ROOT %c = bf16[4,32]{1,0:T(8,128)(2,1)} convert(%a)
}

%body (p: (s32[], f32[256])) -> (s32[], f32[256]) {
  %p = (s32[]{:T(128)}, f32[256]{0:T(256)}) parameter(0)
  %x = f32[256]{0:T(256)} get-tuple-element(%p), index=1
  %y = f32[256]{0:T(256)} add(%x, %x)
  ROOT %t = (s32[]{:T(128)}, f32[256]{0:T(256)}) tuple(%i, %y)
}

%cond (p: (s32[], f32[256])) -> pred[] {
  %p = (s32[]{:T(128)}, f32[256]{0:T(256)}) parameter(0)
  ROOT %lt = pred[]{:T(512)} compare(%i, %n), direction=LT
}

ENTRY %main (x: f32[8,128], w: bf16[4,32], s: f32[64,128]) -> bf16[4,32] {
  %x = f32[8,128]{1,0:T(8,128)} parameter(0)
  %w = bf16[4,32]{1,0:T(8,128)(2,1)} parameter(1)
  %s = f32[64,128]{1,0:T(8,128)} parameter(2)
  %cs = (f32[8,128]{1,0:T(8,128)S(1)}, f32[8,128]{1,0:T(8,128)}, u32[]{:S(2)}) copy-start(%x)
  %cd = f32[8,128]{1,0:T(8,128)S(1)} copy-done(%cs)
  %ss = ((f32[64,128]{1,0:T(8,128)}), f32[16,128]{1,0:T(8,128)S(1)}, s32[]{:S(2)}) slice-start(%s), slice={[0:16], [0:128]}
  %sd = f32[16,128]{1,0:T(8,128)S(1)} slice-done(%ss)
  %f = bf16[4,32]{1,0:T(8,128)(2,1)} fusion(%cd, %w), kind=kLoop, calls=%fused
  %loop = (s32[]{:T(128)}, f32[256]{0:T(256)}) while(%tuple), condition=%cond, body=%body
  ROOT %r = bf16[4,32]{1,0:T(8,128)(2,1)} copy(%f)
}
"""


def test_memory_traffic_counts_each_memory_space_with_tiles_padded():
    tile_f32, tile_bf16 = 8 * 128 * 4, 16 * 128 * 2  # bf16 [4,32] pads to a packed 16x128 tile
    hbm = (tile_f32  # the copy-start reads x from HBM (and writes on-chip memory)
           + 16 * 128 * 4  # the slice-start reads its 16 rows of s, not all 64
           + tile_bf16 * 2  # the fusion reads w, writes its result
           + 256 * 4 * 3  # the loop body's add, counted once (as XLA's cost analysis does)
           + 1  # the loop condition's pred[]
           + tile_bf16 * 2)  # the copy
    on_chip = tile_f32 + 16 * 128 * 4 + tile_f32  # copy and slice destinations; the fusion's read
    assert program_costs.memory_traffic(_TPU_HLO) == {0: hbm, 1: on_chip}


def test_memory_traffic_matches_xlas_bytes_accessed_where_there_is_one_memory_space(tiny_report):
    train = tiny_report["train"]  # XLA:CPU: no memory spaces, no tiles
    assert set(train["traffic_by_memory_space_per_call"]) == {"0"}
    assert train["hbm_bytes_per_call"] == train["bytes_accessed_per_call"]
    assert train["traffic_by_memory_space_per_call"]["0"] == pytest.approx(
        train["bytes_accessed_per_call"], rel=0.02)


def test_chips_and_the_roofline_bound():
    def chip(kind):
        return program_costs.chip_of(SimpleNamespace(device_kind=kind))

    assert chip("TPU v5 lite").name == "TPU v5e" and chip("TPU v4").name == "TPU v4"
    assert chip("TPU v5").name == "TPU v5p" and chip("TPU v6 lite").name == "TPU v6e"
    assert chip("NVIDIA H100 80GB HBM3").name.startswith("NVIDIA H100")
    assert chip("NVIDIA A100-SXM4-40GB").hbm_bytes == 40 * 2**30
    assert chip("cpu") is None
    v5e = program_costs.CHIPS["v5e"]
    # 1 TFLOP and 8.19 GB a call on 10 images: 5.1 ms compute, 10 ms memory -> 1000 images/s/chip.
    bound = program_costs.roofline(1e12, 8.19e9, 10, v5e, 4)
    assert bound["bound_by"] == "memory"
    assert bound["images_per_s_bound"] == pytest.approx(4 * 10 / 0.01)


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is not None, reason="libtpu is installed")
def test_a_topology_without_libtpu_says_how_to_install_it():
    with pytest.raises(RuntimeError, match=rf'pip install "jax\[tpu\]=={jax.__version__}"'):
        program_costs.topology_devices("v5e:2x2")


def test_the_command_prints_the_report_writes_json_and_markdown_rows(tmp_path, repo_env):
    out = tmp_path / "tiny.json"
    result = subprocess.run(
        [sys.executable, "benchmarks/compile_report.py", "--config=tiny", "--programs=inception",
         "--inception_batch=8", f"--json={out}", "--config.model.dtype=bfloat16"],
        cwd=REPO, env=repo_env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[inception]" in result.stdout
    assert "collectives   per network call: none" in result.stdout
    report = json.loads(out.read_text())
    assert report["config"] == "tiny --config.model.dtype=bfloat16"
    assert report["meta"]["num_devices"] == 8 and report["meta"]["dtype"] == "bfloat16"
    [inception] = report["programs"]
    assert inception["images_per_device"] == 1 and inception["flops_per_image"] > 5e9
    rows = subprocess.run(
        [sys.executable, "benchmarks/compile_report.py", f"--markdown={tmp_path}"],
        cwd=REPO, env=repo_env, capture_output=True, text=True, timeout=300,
    )
    assert rows.returncode == 0, rows.stderr[-3000:]
    lines = rows.stdout.strip().splitlines()
    assert lines[0] == program_costs.MARKDOWN_HEADER.splitlines()[0] and len(lines) == 3
    assert "| inception |" in lines[2] and "bfloat16" in lines[2]
