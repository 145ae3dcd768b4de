"""`python -m ddpm_jax.train --config=configs/cifar10.py --workdir=runs/cifar10`.

With no arguments it trains the offline default, configs/mnist5k.py, into runs/mnist5k. Every
config field can be overridden (``--config.optim.lr=1e-4``). Rerunning the same command resumes
from the latest checkpoint in the workdir; SIGTERM/Ctrl-C save a checkpoint and exit.
Launched as several processes (TPU pod slice, SLURM, mpirun, or JAX_COORDINATOR_ADDRESS set),
or with ``--distributed``, it calls ``jax.distributed.initialize()`` first.
"""

from __future__ import annotations

import logging as logging_std
import os
from pathlib import Path

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from ddpm_jax import evaluation, parallel, training

# configs/ lives next to the package in the repository, not inside it.
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "mnist5k.py"

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    str(DEFAULT_CONFIG) if DEFAULT_CONFIG.exists() else None,
    "Training config file (default: the repository's configs/mnist5k.py).",
    lock_config=True,
)
_CPU_DEVICES = flags.DEFINE_integer(
    "cpu_devices", -1,
    "JAX devices to split the host CPU into (CPU backend only): -1 one per core, 0 leave JAX's "
    "default. Ignored when XLA_FLAGS or JAX_NUM_CPU_DEVICES already set a count.",
)
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", None,
    "Call jax.distributed.initialize() (one process per host). Default: when the environment "
    "shows several processes (JAX_COORDINATOR_ADDRESS, TPU_WORKER_HOSTNAMES, SLURM, Open MPI).",
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory of the run (checkpoints, logs, samples); default runs/<config>."
)


def _quiet_orbax_info_logs() -> None:
    """Orbax logs several INFO lines per save; keep its warnings, drop its chatter."""

    class _Filter(logging_std.Filter):
        def filter(self, record: logging_std.LogRecord) -> bool:
            return record.levelno >= logging_std.WARNING or "/orbax/" not in record.pathname

    logging.get_absl_handler().addFilter(_Filter())


def default_run_name(config_flag: flags.Flag) -> str:
    """``cifar10`` for --config=configs/cifar10.py; ``mnist5k_unconditional`` for
    --config=configs/mnist5k.py:unconditional (a config file's get_config argument)."""
    path, _, argument = config_flags.get_config_filename(config_flag).partition(":")
    return "_".join(filter(None, (Path(path).stem, argument)))


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None:
        raise app.UsageError(
            f"No --config given and the default {DEFAULT_CONFIG} does not exist (is ddpm_jax "
            "installed without its repository?). Pass --config=/path/to/configs/mnist5k.py."
        )
    _quiet_orbax_info_logs()
    # Both must happen before anything touches the devices.
    if not parallel.initialize(_DISTRIBUTED.value):
        parallel.split_cpu_into_devices(_CONFIG.value.data.batch_size, _CPU_DEVICES.value)
    workdir = _WORKDIR.value or os.path.join("runs", default_run_name(flags.FLAGS["config"]))
    logging.info(
        "Process %d of %d, workdir %s", jax.process_index(), jax.process_count(), workdir
    )
    state = training.train_and_evaluate(_CONFIG.value, workdir)
    step = int(state.step)
    logging.info("Done at step %d; workdir %s.", step, workdir)
    for path in sorted(Path(workdir, "eval").glob(f"{step}_*.json")):
        for metrics, protocol in evaluation.read_results(path):
            logging.info("Quality: %s; %s", evaluation.describe(metrics, protocol), path)


def run() -> None:
    """Console-script entry point (`ddpm-train`)."""
    app.run(main)


if __name__ == "__main__":
    run()
