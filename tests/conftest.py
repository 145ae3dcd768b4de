"""Test-wide set-up, done before JAX is imported: 8 fake CPU devices for the sharding tests, and
XLA's cheapest CPU back-end optimisation level (tiny test programs spend far longer compiling
than running; this cuts compile time about 3x). Also the environment for subprocess tests."""

import os
import tempfile
from pathlib import Path

import pytest

os.environ["XLA_FLAGS"] = " ".join(
    [
        os.environ.get("XLA_FLAGS", ""),
        "--xla_force_host_platform_device_count=8",
        "--xla_backend_optimization_level=0",
    ]
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# One cache (digits classifier, reference statistics) for the session and its subprocesses, so the
# classifier trains once, and never the user's ~/.cache.
os.environ["DDPM_JAX_CACHE"] = tempfile.mkdtemp(prefix="ddpm_jax_test_cache_")


@pytest.fixture(scope="session")
def repo_env() -> dict[str, str]:
    """This process's environment with the repository first on PYTHONPATH, for tests that run
    `python -m ddpm_jax...` or a benchmarks/ script in a subprocess."""
    root = str(Path(__file__).resolve().parents[1])
    return dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
