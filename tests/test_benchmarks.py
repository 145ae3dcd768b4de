"""The benchmark scripts whose output goes into benchmarks/RESULTS.md, end to end on tiny models."""

import subprocess
import sys
from pathlib import Path

import numpy as np
from test_sample_cli import random_params, tiny_config

from ddpm_jax import checkpointing
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
