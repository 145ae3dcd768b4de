"""The benchmark scripts whose output goes into benchmarks/RESULTS.md, end to end on tiny models."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_convert_parity import CIFAR10_DIFFUSERS
from test_sample_cli import random_params, tiny_config

from ddpm_jax import checkpointing
from ddpm_jax.configs import cifar10
from ddpm_jax.metrics import digits

REPO = Path(__file__).resolve().parent.parent


def test_guidance_sweep_prints_the_digits_metrics_of_each_setting(tmp_path, repo_env):
    config = tiny_config(num_classes=10)  # random weights: only the plumbing is under test
    config.data.image_size = 28
    config.data.class_conditional = True
    config.model.p_uncond = 0.1
    config.sample.num_steps = 2
    checkpointing.save_params_checkpoint(tmp_path, random_params(config), config, step=5)
    env = dict(repo_env, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    result = subprocess.run(
        [sys.executable, "benchmarks/guidance_sweep.py", f"--workdir={tmp_path}",
         "--num_samples=6", "--batch_size=6", "--settings=0;1@500,999"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines()
            if line.startswith("| ") and line[2].isdigit()]
    assert [(w.strip(), t.strip()) for w, t, *_ in rows] == [("0", "-"), ("1", "500-999")]
    for row, name in zip(rows, ("samples_ddpm_2", "samples_ddpm_2_w1_t500-999"), strict=True):
        with np.load(tmp_path / name / "samples.npz") as f:
            expected = digits.digits_metrics(f["arr_0"], f["labels"])
        fd, accuracy, coverage = (float(v) for v in row[2:5])
        assert fd == round(expected["digits_fd"], 2)
        assert accuracy == round(expected["digits_accuracy"], 3)
        assert coverage == round(expected["class_coverage"], 4)
    bad = subprocess.run(
        [sys.executable, "benchmarks/guidance_sweep.py", f"--workdir={tmp_path}",
         "--settings=1@999,400"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert bad.returncode != 0 and "guidance_interval" in bad.stderr


def _benchmark_module(name):
    """A flag-free module of benchmarks/ (the scripts there are not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_diffusers_equivalent_of_the_cifar10_config_is_the_published_model():
    """The side by side's diffusers model of configs/cifar10.py is google/ddpm-cifar10-32's."""
    equivalent = _benchmark_module("diffusers_equivalent")
    config = cifar10.get_config()
    unet = equivalent.unet_config(config)
    published = {k: v for k, v in CIFAR10_DIFFUSERS.items() if not k.startswith("_")}
    assert {k: unet[k] for k in published} == published
    assert unet["dropout"] == 0.1
    # google/ddpm-cifar10-32's scheduler_config.json (β_t variance, x_0 clipped).
    assert equivalent.scheduler_config(config) == dict(
        num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
        prediction_type="epsilon", variance_type="fixed_large", clip_sample=True)
    config.model.resamp_with_conv = False  # diffusers' UNet2DModel always resamples with convs
    with pytest.raises(ValueError, match="no UNet2DModel counterpart"):
        equivalent.unet_config(config)
    config = cifar10.get_config()
    config.model.num_classes = 10
    with pytest.raises(ValueError, match="num_classes=10"):
        equivalent.unet_config(config)


def _side_by_side_rows(stdout):
    """{(task, framework, mode, dtype): median} of the printed tables, and the ratio lines."""
    medians = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.split("|")[1:-1]]
        if len(cells) == 7 and cells[0] in ("train", "sample"):
            medians[tuple(cells[:4])] = float(cells[5])
    ratios = {line.split()[1].rstrip(":"): line for line in stdout.splitlines()
              if line.startswith("ratio ")}
    return medians, ratios


@pytest.mark.parity
def test_side_by_side_times_both_frameworks_and_prints_the_ratio_of_the_best(repo_env):
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    env = dict(repo_env, XLA_FLAGS="--xla_force_host_platform_device_count=2 "
               "--xla_backend_optimization_level=0")
    result = subprocess.run(
        [sys.executable, "benchmarks/diffusers_side_by_side.py", "--tiny", "--skip_compile",
         "--exclude=ddpm_jax:bfloat16"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    medians, ratios = _side_by_side_rows(result.stdout)
    for task in ("train", "sample"):
        assert {k[1:] for k in medians if k[0] == task} == {
            ("ddpm_jax", "jit", "float32"), ("diffusers", "eager", "float32"),
            ("diffusers", "eager", "bfloat16")}
        ours = max(v for k, v in medians.items() if k[:2] == (task, "ddpm_jax"))
        theirs = max(v for k, v in medians.items() if k[:2] == (task, "diffusers"))
        ratio = float(ratios[task].split()[2].rstrip("x"))
        assert ratio == pytest.approx(ours / theirs, rel=0.01, abs=0.01)
    assert "0.16M params, batch 8" in result.stdout
    assert "left out: ddpm_jax:bfloat16" in result.stdout
    bad = subprocess.run(
        [sys.executable, "benchmarks/diffusers_side_by_side.py", "--tiny",
         "--exclude=ddpm_jax:float64"], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=300,
    )
    assert bad.returncode != 0 and "--exclude=ddpm_jax:float64" in bad.stderr


def test_side_by_side_says_which_package_is_missing(tmp_path, repo_env):
    (tmp_path / "sitecustomize.py").write_text(  # as if diffusers were not installed
        "import sys\nsys.modules['diffusers'] = None\n")
    env = dict(repo_env, PYTHONPATH=f"{tmp_path}:{repo_env['PYTHONPATH']}")
    result = subprocess.run(
        [sys.executable, "benchmarks/diffusers_side_by_side.py", "--tiny"], cwd=REPO, env=env,
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("diffusers_side_by_side.py: error: The diffusers side needs torch and "
                           "diffusers (the [parity] extra")
    assert "--frameworks=ddpm_jax" in last


@pytest.mark.slow
def test_device_check_writes_a_results_row_for_every_step(tmp_path, repo_env):
    env = dict(repo_env, OUT=str(tmp_path), PYTHON=sys.executable,
               XLA_FLAGS="--xla_force_host_platform_device_count=2 "
               "--xla_backend_optimization_level=0")
    result = subprocess.run(["bash", "benchmarks/device_check.sh", "--tiny"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:]
    rows = (tmp_path / "device_check_rows.md").read_text().splitlines()
    assert rows[:2] == ["| date | device | versions | command | figure |", "|---|---|---|---|---|"]
    cells = [[c.strip() for c in row.split("|")[1:-1]] for row in rows[2:]]
    assert all(len(c) == 5 and c[1] and "jax " in c[2] for c in cells), rows
    figures = {}  # the script or "pytest" -> its rows' figures
    for _, _, _, command, figure in cells:
        program = next(w for w in command.strip("`").split() if w.endswith(".py") or w == "pytest")
        figures.setdefault(program, []).append(figure)
    assert "passed" in figures["pytest"][0] and "failed" not in figures["pytest"][0]
    assert len(figures["benchmarks/train_throughput.py"]) == 2
    for figure in figures["benchmarks/train_throughput.py"] + figures[
            "benchmarks/inception_throughput.py"]:
        assert float(figure.split()[0]) > 0 and "images/s" in figure
    side = figures["benchmarks/diffusers_side_by_side.py"]
    assert any(f.startswith("train ddpm_jax jit float32: ") for f in side)
    assert any(f.startswith("sample ddpm_jax jit float32: ") for f in side)
    if importlib.util.find_spec("torch") and importlib.util.find_spec("diffusers"):
        assert any(f.startswith("ratio train: ") for f in side)
    assert result.stdout.rstrip().endswith(rows[-1])  # the rows are echoed
