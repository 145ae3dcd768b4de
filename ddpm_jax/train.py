"""`python -m ddpm_jax.train --config=cifar10 --workdir=runs/cifar10`.

``--config`` takes a shipped config's name (ddpm_jax/configs/, e.g. ``cifar10``) or any config
file's path (``configs/cifar10.py`` in a clone, a file of your own), each optionally followed by
``:argument`` for its get_config (``mnist5k:unconditional``). With no arguments it trains the
offline default, mnist5k, into runs/mnist5k. Every config field can be overridden
(``--config.optim.lr=1e-4``). Rerunning the same command resumes from the latest checkpoint in
the workdir; SIGTERM/Ctrl-C save a checkpoint and exit.
Launched as several processes (TPU pod slice, SLURM, mpirun, or JAX_COORDINATOR_ADDRESS set),
or with ``--distributed``, it calls ``jax.distributed.initialize()`` first.

Exit status: 0 when the run is done, or stopped by a signal with its checkpoint saved (rerun to
resume); 3 when the loss became non-finite: do not requeue (a rerun resumes from the last good
checkpoint, which is intact, and diverges again at the same step; change the config first, e.g.
a lower config.optim.lr); 1 for any other error (bad input, a failed save, a bug).
"""

from __future__ import annotations

import logging as logging_std
import os
from pathlib import Path

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from ddpm_jax import cache, cli, config_checks, configs, evaluation, parallel, training

DEFAULT_CONFIG = configs.DIRECTORY / "mnist5k.py"


class _ConfigNameOrPath(flags.ArgumentParser):
    """ml_collections' config file parser, given a shipped config's name resolved to its file."""

    def __init__(self, parser: flags.ArgumentParser) -> None:
        self._parser = parser

    def parse(self, argument: str) -> ml_collections.ConfigDict:
        return self._parser.parse(configs.resolve(argument))

    def flag_type(self) -> str:
        return self._parser.flag_type()


def define_config_flag(flag_values: flags.FlagValues = flags.FLAGS) -> flags.FlagHolder:
    """``--config``: a shipped config's name or a config file's path (default: the offline
    mnist5k); ``--config.field=value`` overrides a field."""
    holder = config_flags.DEFINE_config_file(
        "config",
        str(DEFAULT_CONFIG),
        f"A shipped config ({', '.join(configs.names())}) or a config file's path, either with an "
        "optional :argument for its get_config (mnist5k:unconditional).",
        flag_values=flag_values,
        lock_config=True,
    )
    # ml_collections loads the value as a file path, with no hook to look a name up first.
    flag_values["config"].parser = _ConfigNameOrPath(flag_values["config"].parser)
    return holder


_CONFIG = define_config_flag()
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
    """``cifar10`` for --config=cifar10 or --config=configs/cifar10.py; ``mnist5k_unconditional``
    for --config=mnist5k:unconditional (a config's get_config argument)."""
    path, _, argument = config_flags.get_config_filename(config_flag).partition(":")
    return "_".join(filter(None, (Path(path).stem, argument)))


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    _quiet_orbax_info_logs()
    # Both must happen before anything touches the devices (the config check below builds the
    # sampler's schedule tables as JAX arrays).
    if not parallel.initialize(_DISTRIBUTED.value):
        parallel.split_cpu_into_devices(_CONFIG.value.data.batch_size, _CPU_DEVICES.value)
    # Every field but the device relations, which train_and_evaluate checks once devices exist;
    # before the workdir is written.
    config_checks.check_config(_CONFIG.value, "train")
    cache.enable_compilation_cache()
    workdir = _WORKDIR.value or os.path.join("runs", default_run_name(flags.FLAGS["config"]))
    logging.info(
        "Process %d of %d, workdir %s", jax.process_index(), jax.process_count(), workdir
    )
    state = training.train_and_evaluate(_CONFIG.value, workdir)
    step = int(state.step)
    if step < _CONFIG.value.train.num_steps:
        logging.info("Stopped at step %d of %d; workdir %s. Rerun the same command to resume.",
                     step, _CONFIG.value.train.num_steps, workdir)
        return
    logging.info("Done at step %d; workdir %s.", step, workdir)
    for path in sorted(Path(workdir, "eval").glob(f"{step}_*.json")):
        for metrics, protocol in evaluation.read_results(path):
            logging.info("Quality: %s; %s", evaluation.describe(metrics, protocol), path)


def run() -> None:
    """Console-script entry point (`ddpm-train`)."""
    cli.run(main, "ddpm_jax.train")


if __name__ == "__main__":
    run()
