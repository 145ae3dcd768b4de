"""Multi-host start-up decisions and the data mesh (ddpm_jax.parallel)."""

import jax
import numpy as np
import pytest

from ddpm_jax import parallel


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, False),
        ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, True),
        ({"TPU_WORKER_HOSTNAMES": "t1v-0"}, False),  # a single-host TPU VM
        ({"TPU_WORKER_HOSTNAMES": "t1v-0,t1v-1,t1v-2,t1v-3"}, True),  # a pod slice
        ({"SLURM_NTASKS": "1"}, False),
        ({"SLURM_NTASKS": "16"}, True),
        ({"SLURM_NTASKS": "garbage"}, False),
        ({"OMPI_COMM_WORLD_SIZE": "2"}, True),
    ],
)
def test_multiprocess_launch_is_read_from_the_environment(env, expected):
    assert parallel.is_multiprocess_launch(env) is expected


@pytest.mark.parametrize(
    "flag, env, expect_init",
    [
        (None, {}, False),
        (None, {"SLURM_NTASKS": "4"}, True),
        (True, {}, True),  # --distributed forces it (TPU metadata finds the hosts)
        (False, {"SLURM_NTASKS": "4"}, False),  # --nodistributed: one process per task
    ],
)
def test_initialize_follows_the_flag_then_the_environment(monkeypatch, flag, env, expect_init):
    for name in ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "SLURM_NTASKS",
                 "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda: calls.append(1))
    assert parallel.initialize(flag) is expect_init
    assert calls == ([1] if expect_init else [])


def test_data_mesh_spans_every_device():
    mesh = parallel.make_data_mesh()
    assert mesh.axis_names == ("data",)
    assert mesh.size == jax.device_count() == 8  # conftest's fake CPU devices
    assert set(mesh.devices.flat) == set(jax.devices())


class _Processes:
    """Pretends to be process ``index`` of 2; ``broadcast_one_to_all`` returns process 0's
    value, given here as ``process_0_failed``."""

    def __init__(self, monkeypatch, index: int, process_0_failed: bool):
        monkeypatch.setattr(jax, "process_count", lambda: 2)
        monkeypatch.setattr(jax, "process_index", lambda: index)
        sent = []

        def broadcast(value):
            sent.append(int(value))
            return np.asarray(int(process_0_failed) if index else int(value), np.int32)

        monkeypatch.setattr(parallel.multihost_utils, "broadcast_one_to_all", broadcast)
        self.sent = sent


def test_on_process_0_runs_once_and_everyone_learns_of_a_failure(monkeypatch):
    calls = []
    _Processes(monkeypatch, index=1, process_0_failed=False)
    parallel.on_process_0(lambda: calls.append(1), "Preparing x")
    assert calls == []  # process 1 waits: it does not do the work

    _Processes(monkeypatch, index=1, process_0_failed=True)
    with pytest.raises(RuntimeError, match="Preparing x failed on process 0"):
        parallel.on_process_0(lambda: calls.append(1), "Preparing x")

    processes = _Processes(monkeypatch, index=0, process_0_failed=False)

    def fail():
        raise ValueError("disk full")

    with pytest.raises(ValueError, match="disk full"):  # its own error, after telling the others
        parallel.on_process_0(fail, "Preparing x")
    assert processes.sent == [1]
