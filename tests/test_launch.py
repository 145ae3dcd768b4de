"""launch/gpu_slurm.sh's requeue decision, run under sbatch's environment with a fake `srun` that
exits with a chosen status and a fake `scontrol` that records what it was asked."""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "launch" / "gpu_slurm.sh"
DO_NOT_REQUEUE = 3  # training.NonFiniteLossError.exit_status, kept equal by the test below


@pytest.fixture
def slurm(tmp_path):
    """An environment like a SLURM batch job's, with fake srun and scontrol first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(
        '#!/usr/bin/env bash\necho "$@" >> "$FAKE_LOG.srun"\n'
        'sleep "${FAKE_SLEEP:-0}"\nexit "$FAKE_STATUS"\n'
    )
    (bin_dir / "scontrol").write_text('#!/usr/bin/env bash\necho "$@" >> "$FAKE_LOG.scontrol"\n')
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    log = tmp_path / "calls"
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="42",
               FAKE_LOG=str(log))
    env.pop("SLURM_RESTART_COUNT", None)
    env.pop("DDPM_JAX_MAX_REQUEUES", None)

    def requeues(log: Path = log) -> list[str]:
        path = Path(f"{log}.scontrol")
        return path.read_text().splitlines() if path.exists() else []

    return env, requeues, log


def _launch(env: dict, **extra: str) -> subprocess.Popen:
    return subprocess.Popen(["bash", str(SCRIPT), "configs/tiny.py", "runs/tiny", "--x=1"],
                            env=dict(env, **extra), cwd=ROOT, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("status, restarts, requeued", [
    (0, "0", False),  # done, or stopped at the time limit with its checkpoint
    (DO_NOT_REQUEUE, "0", False),  # non-finite loss: a rerun would diverge again
    (1, "0", True),  # any other failure
    (137, "2", True),  # a task killed by a signal
    (1, "3", False),  # the requeue limit (DDPM_JAX_MAX_REQUEUES, default 3) is reached
])
def test_requeues_failures_but_not_a_non_finite_loss(slurm, status, restarts, requeued):
    env, requeues, log = slurm
    process = _launch(env, FAKE_STATUS=str(status), SLURM_RESTART_COUNT=restarts)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == status, stderr
    assert Path(f"{log}.srun").read_text().split() == [
        "--kill-on-bad-exit=1", "python", "-m", "ddpm_jax.train", "--config=configs/tiny.py",
        "--workdir=runs/tiny", "--x=1",
    ]
    assert requeues() == (["requeue 42"] if requeued else [])
    if status == DO_NOT_REQUEUE:
        assert "non-finite loss (exit status 3): not requeueing job 42" in stderr


def test_sigterm_to_the_batch_shell_waits_for_the_training(slurm):
    """scancel/preemption signal the batch shell too: it must outlive srun (which saves)."""
    env, requeues, _ = slurm
    process = _launch(env, FAKE_STATUS="0", FAKE_SLEEP="2")
    time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    assert "SIGTERM: waiting for the training to save and exit" in stderr
    assert requeues() == []


def test_the_script_and_the_trainer_agree_on_the_status():
    from ddpm_jax import training

    assert training.NonFiniteLossError.exit_status == DO_NOT_REQUEUE
    assert f"readonly DO_NOT_REQUEUE={DO_NOT_REQUEUE}" in SCRIPT.read_text()
