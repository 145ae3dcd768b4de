"""How a run is laid out over processes and devices: multi-host start-up and the data mesh.

Shared by ``ddpm_jax.train``, ``ddpm_jax.sample``, ``ddpm_jax.evaluate`` and the benchmarks.
``initialize`` and ``split_cpu_into_devices`` must run before anything touches the devices.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh


def is_multiprocess_launch(env: dict[str, str] | None = None) -> bool:
    """Whether the environment says this process is one of several: JAX_COORDINATOR_ADDRESS,
    several TPU_WORKER_HOSTNAMES (a pod slice), SLURM_NTASKS > 1 or OMPI_COMM_WORLD_SIZE > 1."""
    env = os.environ if env is None else env

    def count(name: str) -> int:
        try:
            return int(env.get(name, "1"))
        except ValueError:
            return 1

    tpu_hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
    return (
        "JAX_COORDINATOR_ADDRESS" in env
        or len(tpu_hosts) > 1
        or count("SLURM_NTASKS") > 1
        or count("OMPI_COMM_WORLD_SIZE") > 1
    )


def initialize(distributed: bool | None = None) -> bool:
    """Calls ``jax.distributed.initialize()`` when ``distributed`` is True, or when it is None and
    ``is_multiprocess_launch()``. Returns whether it did. Call first, before any device use.

    TPU pod slices, SLURM and Open MPI are detected by JAX itself. A manual launch (any machines,
    any cluster manager) sets JAX_COORDINATOR_ADDRESS=host:port on every process, plus
    JAX_NUM_PROCESSES and JAX_PROCESS_ID, which are passed on here (JAX reads only the first).
    CPU collectives across processes use gloo.
    """
    if not (distributed or (distributed is None and is_multiprocess_launch())):
        return False
    kwargs = {}
    for variable, argument in (("JAX_NUM_PROCESSES", "num_processes"),
                               ("JAX_PROCESS_ID", "process_id")):
        if variable in os.environ:
            try:
                kwargs[argument] = int(os.environ[variable])
            except ValueError:
                raise ValueError(
                    f"{variable}={os.environ[variable]!r} must be an integer."
                ) from None
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)
    return True


def split_cpu_into_devices(batch_size: int, count: int = -1) -> None:
    """Makes JAX's CPU backend ``count`` devices (-1: one per core), the largest number <= count
    that divides ``batch_size``; 0 leaves JAX's default. Call before anything touches the devices.

    XLA:CPU runs much of a train step on one thread; data parallelism over per-core CPU devices
    uses every core (2.3x the images/s of one device for configs/mnist5k.py on 2 cores; see
    benchmarks/RESULTS.md). Only the CPU backend is affected, and nothing changes when XLA_FLAGS
    or JAX_NUM_CPU_DEVICES already set a count.
    """
    if count == 0 or jax.config.jax_num_cpu_devices != -1:
        return
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return
    if count < 0:
        count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    jax.config.update(
        "jax_num_cpu_devices", max(d for d in range(1, (count or 1) + 1) if batch_size % d == 0)
    )


def make_data_mesh() -> Mesh:
    """The 1-D ('data',) mesh over every device of every process (topology-aware order)."""
    return jax.make_mesh(
        (jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,)
    )


def padded_batch_size(batch_size: int, device_count: int, name: str = "batch_size") -> int:
    """The smallest multiple of ``device_count`` >= ``batch_size``: a batch that does not divide
    the devices is padded to it, so each device computes an equal share of rows (the padding rows
    are dropped afterwards) instead of every device computing all of them. ``name`` names the
    setting in the error for a batch size < 1."""
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"{name}={batch_size!r} must be a positive integer.")
    return -(-batch_size // device_count) * device_count


def on_process_0(fn: Callable[[], None], what: str) -> None:
    """Runs ``fn`` on process 0 only while the others wait; if it raised, every process raises
    (process 0 its error, the others a RuntimeError naming ``what``), so that no process is left
    waiting in a later collective. For work on a shared file system that one process must do
    (preparing a dataset, checking or writing a settings file). Every process must call it."""
    if jax.process_count() == 1:
        fn()
        return
    error = None
    if jax.process_index() == 0:
        try:
            fn()
        except Exception as e:  # re-raised below, after the others have been told
            error = e
    failed = multihost_utils.broadcast_one_to_all(np.asarray(error is not None, np.int32))
    if error is not None:
        raise error
    if int(failed):
        raise RuntimeError(f"{what} failed on process 0; its log says why.")
