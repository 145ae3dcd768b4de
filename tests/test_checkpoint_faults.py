"""Damaged checkpoints and failed saves, end to end: the real commands in subprocesses.

One tiny run (checkpoints 2 and 4) is copied and damaged the ways full disks, cut copies and kills
damage checkpoints. Rerunning the same training command then resumes from checkpoint 2 (checkpoint
4 renamed aside, never deleted) and ends bit-identical to the undamaged run; sample and evaluate
say in a few lines which checkpoint is damaged and which to use instead. The subprocesses share
one persistent XLA compilation cache, so only the first of them compiles.
"""

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
import pytest

from test_train import _final_state


ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.py"
# The one training command of these tests: checkpoints at steps 2 and 4, no sample grids.
TRAIN_FLAGS = (
    f"--config={TINY}", "--config.train.num_steps=4", "--config.train.checkpoint_every=2",
    "--config.train.log_every=2", "--config.train.sample_every=0",
)
EVENT_LOOP_NOISE = "Event loop is closed"


@pytest.fixture(scope="module")
def env(tmp_path_factory, repo_env) -> dict[str, str]:
    """repo_env on 2 fake devices, with a compilation cache shared by this module's commands."""
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", repo_env["XLA_FLAGS"])
    return dict(
        repo_env, XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count=2",
        JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("xla_cache")),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    )


def _run(module: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """`python -m <module> *args` in a fresh process."""
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def _train(workdir: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return _run("ddpm_jax.train", env, f"--workdir={workdir}", *TRAIN_FLAGS, *args)


def _state(workdir: Path, step: int) -> list[np.ndarray]:
    """The leaves of the training state saved at ``step``."""
    return [np.asarray(x) for x in jax.tree.leaves(_final_state(workdir, step))]


def _assert_bit_identical(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.dtype == y.dtype and np.array_equal(x, y)


@pytest.fixture(scope="module")
def run(tmp_path_factory, env) -> tuple[Path, list[np.ndarray]]:
    """The undamaged run (checkpoints 2 and 4) and its state at step 4."""
    workdir = tmp_path_factory.mktemp("run")
    result = _train(workdir, env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "4"]
    return workdir, _state(workdir, 4)


def _copy(run: tuple[Path, list[np.ndarray]], tmp_path: Path) -> Path:
    workdir = tmp_path / "run"
    shutil.copytree(run[0], workdir)
    return workdir


# ----------------------------------------------------------------------------------------------
# Damage, each to a step directory; returns the damaged file (relative to it).
# ----------------------------------------------------------------------------------------------
def _data_files(step_dir: Path) -> list[Path]:
    """The files of Orbax's OCDBT database that hold the arrays' chunks, largest first."""
    files = list((step_dir / "state").glob("ocdbt.process_*/d/*"))
    return sorted(files, key=lambda f: f.stat().st_size, reverse=True)


def _zero_the_first_100_bytes(file: Path, step_dir: Path) -> Path:
    file.write_bytes(bytes(100) + file.read_bytes()[100:])
    return file.relative_to(step_dir)


def overwrite_the_start_of_the_tree_file(step_dir: Path) -> Path:
    """The issue's damage: the first 100 bytes of the file under state/d/ (the database's tree)."""
    (tree_file,) = (step_dir / "state" / "d").iterdir()
    return _zero_the_first_100_bytes(tree_file, step_dir)


def corrupt_an_array_file(step_dir: Path) -> Path:
    return _zero_the_first_100_bytes(_data_files(step_dir)[0], step_dir)


def truncate_an_array_file(step_dir: Path) -> Path:
    data_file = _data_files(step_dir)[0]
    os.truncate(data_file, data_file.stat().st_size // 2)
    return data_file.relative_to(step_dir)


def delete_the_metadata_file(step_dir: Path) -> Path:
    (step_dir / "state" / "_METADATA").unlink()
    return Path("state/_METADATA")


def _contents(path: Path) -> bytes | None:
    return path.read_bytes() if path.exists() else None


# ----------------------------------------------------------------------------------------------
# Training.
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", [
    overwrite_the_start_of_the_tree_file, corrupt_an_array_file, truncate_an_array_file,
    delete_the_metadata_file,
])
def test_rerun_moves_the_damaged_checkpoint_aside_and_resumes_bit_identically(
    run, tmp_path, env, damage: Callable[[Path], Path]
):
    workdir = _copy(run, tmp_path)
    checkpoints = workdir / "checkpoints"
    damaged_file = damage(checkpoints / "4")
    damaged_contents = _contents(checkpoints / "4" / damaged_file)

    result = _train(workdir, env)
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if "is damaged" in line]
    assert len(warnings) == 1, result.stderr[-3000:]
    assert (f"Checkpoint step 4 is damaged: moved it to {checkpoints / '4.damaged-1'} and resumed "
            f"from step 2. File: {checkpoints / '4' / 'state'}") in warnings[0]
    assert "Reason: " in warnings[0]
    assert "Resumed from the checkpoint at step 2" in result.stderr
    assert "Traceback" not in result.stderr and EVENT_LOOP_NOISE not in result.stderr
    # Renamed, not deleted: the damage is still there for a post-mortem.
    assert sorted(p.name for p in checkpoints.iterdir()) == ["2", "4", "4.damaged-1"]
    assert _contents(checkpoints / "4.damaged-1" / damaged_file) == damaged_contents
    _assert_bit_identical(_state(workdir, 4), run[1])


def test_rerun_after_a_kill_mid_save_resumes_bit_identically(run, tmp_path, env):
    """A kill during the save of step 4 leaves `4.orbax-checkpoint-tmp`, half written."""
    workdir = _copy(run, tmp_path)
    checkpoints = workdir / "checkpoints"
    half_written = checkpoints / "4.orbax-checkpoint-tmp"
    (checkpoints / "4").rename(half_written)
    truncate_an_array_file(half_written)

    result = _train(workdir, env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Resumed from the checkpoint at step 2" in result.stderr
    assert "is damaged" not in result.stderr and "Traceback" not in result.stderr
    assert sorted(p.name for p in checkpoints.iterdir()) == ["2", "4"]  # Orbax cleaned it up
    _assert_bit_identical(_state(workdir, 4), run[1])


# `python -m ddpm_jax.train` in a process that may write no file over 30 kB, as on a nearly full
# disk: the checkpoint's files do not fit (Python ignores SIGXFSZ: the write fails with EFBIG).
_TRAIN_WITH_SMALL_FILES = """
import resource, runpy
resource.setrlimit(resource.RLIMIT_FSIZE, (30_000, resource.RLIM_INFINITY))
runpy.run_module("ddpm_jax.train", run_name="__main__", alter_sys=True)
"""


def test_a_failed_save_stops_training_and_keeps_the_earlier_checkpoint(run, tmp_path, env):
    workdir = _copy(run, tmp_path)
    checkpoints = workdir / "checkpoints"
    shutil.rmtree(checkpoints / "4")
    keep_one = "--config.train.keep_checkpoints=1"  # a finished save of 4 would delete 2

    result = subprocess.run(
        [sys.executable, "-c", _TRAIN_WITH_SMALL_FILES, f"--workdir={workdir}", *TRAIN_FLAGS,
         keep_one], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode != 0
    prefix = f"Could not save the checkpoint of step 4 in {checkpoints}: "
    errors = [line for line in result.stderr.splitlines() if prefix in line]
    assert len(errors) == 1, result.stderr[-3000:]
    error = errors[0]
    assert "File too large" in error
    # Orbax's writer threads may print onto the same line after it: look inside the line.
    assert ("The earlier checkpoints (steps [2]) are intact: free space there (or fix the "
            "storage) and rerun the same command; it resumes from step 2.") in error
    assert (checkpoints / "2").is_dir() and not (checkpoints / "4").exists()

    result = _train(workdir, env, keep_one)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Resumed from the checkpoint at step 2" in result.stderr
    assert sorted(p.name for p in checkpoints.iterdir()) == ["4"]
    _assert_bit_identical(_state(workdir, 4), run[1])


# ----------------------------------------------------------------------------------------------
# Sampling and evaluation.
# ----------------------------------------------------------------------------------------------
def test_sample_and_evaluate_name_the_damaged_checkpoint_and_another_to_use(run, tmp_path, env):
    workdir = _copy(run, tmp_path)
    checkpoints = workdir / "checkpoints"
    for data_file in _data_files(checkpoints / "4"):  # damages EMA params among the others
        os.truncate(data_file, data_file.stat().st_size // 2)
    expected = re.compile(
        f"Could not read a checkpoint from {re.escape(str(workdir))}: checkpoint step 4 is "
        f"damaged: {re.escape(str(checkpoints / '4' / 'state'))}/ "
        r"\(array ema_params\.[^)]+\): OUT_OF_RANGE: .*Use another checkpoint: "
        f"--checkpoint={re.escape(str(checkpoints / '2'))} " r"\(with --out\)\.$"
    )
    sample_args = ("--num_samples=8", "--batch_size=8")

    sample = _run("ddpm_jax.sample", env, f"--workdir={workdir}", *sample_args)
    evaluate = _run("ddpm_jax.evaluate", env, f"--workdir={workdir}", "--metrics=digits",
                    *sample_args)
    for result in (sample, evaluate):
        lines = result.stderr.splitlines()
        assert result.returncode != 0
        assert EVENT_LOOP_NOISE not in result.stderr
        assert expected.search(lines[-1]), result.stderr[-3000:]
        assert len(lines) <= 10  # Orbax's few INFO lines, then the error
    assert not list(workdir.glob("samples_*"))

    suggested = _run("ddpm_jax.sample", env, f"--checkpoint={checkpoints / '2'}",
                     f"--out={tmp_path / 'samples'}", *sample_args)
    assert suggested.returncode == 0, suggested.stderr[-3000:]
    assert (tmp_path / "samples" / "samples.npz").exists()


# A failed read used to leave TensorStore reads in flight that called back into Orbax's closed
# event loop ("RuntimeError: Event loop is closed", one traceback each; timing-dependent, so
# read ten times).
_READ_REPEATEDLY = """
import sys
from ddpm_jax import checkpointing
for _ in range(10):
    try:
        checkpointing.load_ema_params(sys.argv[1])
    except checkpointing.DamagedCheckpointError as e:
        error = e
print(error.file)
"""


def test_failed_reads_leave_nothing_to_call_back_into_a_closed_event_loop(run, tmp_path, env):
    workdir = _copy(run, tmp_path)
    for data_file in _data_files(workdir / "checkpoints" / "4"):
        os.truncate(data_file, data_file.stat().st_size // 2)
    result = subprocess.run([sys.executable, "-c", _READ_REPEATEDLY, str(workdir)], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith(str(workdir / "checkpoints" / "4" / "state"))
    assert EVENT_LOOP_NOISE not in result.stderr and "Traceback" not in result.stderr
