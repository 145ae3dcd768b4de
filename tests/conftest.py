"""Test-wide set-up, done before JAX is imported: 8 fake CPU devices for the sharding tests, and
XLA's cheapest CPU back-end optimisation level (tiny test programs spend far longer compiling
than running; this cuts compile time about 3x)."""

import os

os.environ["XLA_FLAGS"] = " ".join(
    [
        os.environ.get("XLA_FLAGS", ""),
        "--xla_force_host_platform_device_count=8",
        "--xla_backend_optimization_level=0",
    ]
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
