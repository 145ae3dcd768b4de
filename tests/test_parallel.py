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


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(env: dict[str, str], *args: str, cwd) -> list[str]:
    """Runs ``python -m *args`` as processes 0 and 1 of a manual launch (JAX_COORDINATOR_ADDRESS,
    JAX_NUM_PROCESSES, JAX_PROCESS_ID on localhost, CPU collectives over gloo, one CPU device
    each); returns their logs after both exit 0."""
    import subprocess
    import sys

    port = _free_port()
    env = dict(env, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
               XLA_FLAGS="--xla_backend_optimization_level=0")
    procs = [subprocess.Popen([sys.executable, "-m", *args], cwd=cwd, text=True,
                              env=dict(env, JAX_PROCESS_ID=str(i)), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT) for i in range(2)]
    logs = [p.communicate(timeout=400)[0] for p in procs]
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-3000:]
    return logs


@pytest.mark.slow
def test_two_processes_train_resume_and_sample(tmp_path, repo_env):
    """A manual two-process launch on localhost: training writes each checkpoint and the logs
    once, a rerun resumes both processes from it, and sampling gives the one-process images."""
    workdir = tmp_path / "run"
    train = ["ddpm_jax.train", "--config=tiny", f"--workdir={workdir}",
             "--config.train.sample_every=0", "--config.train.log_every=2"]
    logs = _two_processes(repo_env, *train, "--config.train.num_steps=2", cwd=tmp_path)
    assert all("Done at step 2" in log for log in logs)
    assert '"process_count": 2' in (workdir / "mesh.json").read_text()
    assert len(list(workdir.glob("events.out.tfevents.*"))) == 1  # process 0 writes the logs
    logs = _two_processes(repo_env, *train, "--config.train.num_steps=4", cwd=tmp_path)
    assert all("Resumed from the checkpoint at step 2" in log and "Done at step 4" in log
               for log in logs)
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "4"]

    sample = ["ddpm_jax.sample", f"--workdir={workdir}", "--num_samples=10", "--batch_size=8",
              "--sampler=ddim", "--steps=2"]
    _two_processes(repo_env, *sample, f"--out={tmp_path / 'two'}", cwd=tmp_path)
    import subprocess
    import sys

    one = subprocess.run([sys.executable, "-m", *sample, f"--out={tmp_path / 'one'}"],
                         cwd=tmp_path, env=repo_env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    with np.load(tmp_path / "two" / "samples.npz") as two, np.load(
            tmp_path / "one" / "samples.npz") as single:
        np.testing.assert_array_equal(two["arr_0"], single["arr_0"])
    assert sorted(p.name for p in (tmp_path / "two").glob("samples_*.npz")) == [
        "samples_00000.npz", "samples_00001.npz"]
