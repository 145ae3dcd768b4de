"""The scripts in benchmarks/ run and measure what they claim (on real data, not a model)."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

import ddpm_jax.datasets  # noqa: F401  (registers mnist5k)

ROOT = Path(__file__).resolve().parents[1]


def test_mnist_sample_quality_tells_digits_from_noise(tmp_path, repo_env):
    """Real digits passed off as conditional samples score at least the held-out reference;
    uniform noise with random labels scores near chance."""
    real = tfds.as_numpy(tfds.load("mnist5k", split="train[:400]", batch_size=-1))
    digits, noise = tmp_path / "digits.npz", tmp_path / "noise.npz"
    np.savez(digits, real["image"], labels=real["label"])
    rng = np.random.default_rng(0)
    np.savez(noise, rng.integers(0, 256, (500, 28, 28, 1), dtype=np.uint8),
             labels=rng.integers(0, 10, 500))
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "mnist_sample_quality.py"), str(digits),
         str(noise)], cwd=ROOT, env=repo_env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]

    def accuracy(name):
        line = next(line for line in result.stdout.splitlines() if line.startswith(name))
        return float(re.search(r"classified as their label (\d\.\d+)", line).group(1))

    held_out = accuracy("real digits (held out)")
    assert held_out > 0.9
    # Mostly the classifier's own training digits: at least as well recognized as held-out ones.
    assert accuracy(str(digits)) >= held_out
    assert accuracy(str(noise)) < 0.2
