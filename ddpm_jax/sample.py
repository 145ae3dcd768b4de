"""`python -m ddpm_jax.sample --workdir=runs/cifar10 --sampler=ddim --steps=100`.

Draws ``--num_samples`` images (default 50,000, for FID) from the EMA params of a checkpoint (the
latest of ``--workdir``, or the step directory ``--checkpoint``) into ``--out`` (default
``<workdir>/samples_<sampler>_<steps>[_w<guidance>[_t<t_min>-<t_max>]][_<labels>]``) with
``--labels`` and classifier-free guidance ``--guidance=w`` (at the timesteps of
``--guidance_interval`` only, if given): chunk files, the merged ``samples.npz`` (uint8 NHWC
under "arr_0", + "labels"), ``grid.png`` and with ``--trajectory`` the denoising film; see
``ddpm_jax.generation``. A rerun after preemption skips the chunks already on disk and gives the
same images. Launched as several processes (or with ``--distributed``) it calls
``jax.distributed.initialize()`` first, as ``ddpm_jax.train`` does; process 0 writes the files.
"""

from __future__ import annotations

from typing import Any

from absl import app, flags, logging

from ddpm_jax import cache, cli, config_checks, generation, parallel, sampler_spec

PyTree = Any

_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Training workdir: sample from the EMA params of its latest checkpoint.",
    allow_override=True,  # ddpm_jax.train defines --workdir too; both may live in one process
)
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "One checkpoint step directory (e.g. <workdir>/checkpoints/800000)."
)
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 50_000, "Number of images to draw.")
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", 256, "Global batch size; one that is not a multiple of the device count is "
    "padded to one (the same images, some extra work).", lower_bound=1,
)
_SEED = flags.DEFINE_integer(
    "seed", 0, "Root seed; chunk c uses fold_in(keys.stream(seed, keys.SAMPLE), c)."
)
_OUT = flags.DEFINE_string(
    "out", None, "Output directory (default: <workdir>/samples_<sampler>_<steps>[_...])."
)
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", None,
    "Call jax.distributed.initialize() (one process per host). Default: when the environment "
    "shows several processes (JAX_COORDINATOR_ADDRESS, TPU_WORKER_HOSTNAMES, SLURM, Open MPI).",
    allow_override=True,  # ddpm_jax.train defines --distributed too
)
_LABELS = flags.DEFINE_string(
    "labels", "random", "Class-conditional models: 'random' (uniform), one class ('3'), a list "
    "('1,4,7', cycled over the samples), 'all' (i mod K: column k of a K-column grid is class "
    "k) or 'none' (unconditional, from a model trained with label dropout).",
)
_TRAJECTORY = flags.DEFINE_bool(
    "trajectory", False, "Also write the denoising film of the first samples as PNG strips."
)
sampler_spec.define_flags()  # --sampler, --steps, --eta, ..., --guidance, --guidance_interval
flags.adopt_module_key_flags(sampler_spec)  # listed by --help


def parse_labels(text: str) -> sampler_spec.Labels:
    """``--labels``: 'random', 'all' (the "grid" labels), 'none', or comma-separated classes."""
    if text in ("random", "none"):
        return text
    if text == "all":
        return "grid"
    try:
        return tuple(int(k) for k in text.split(","))
    except ValueError:
        raise app.UsageError(
            f"--labels={text!r}: use random, all, none, one class (3) or a list (1,4,7)."
        ) from None


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if (_WORKDIR.value is None) == (_CHECKPOINT.value is None):
        raise app.UsageError("Pass exactly one of --workdir and --checkpoint.")
    if _CHECKPOINT.value is not None and _OUT.value is None:
        raise app.UsageError("With --checkpoint, pass --out too.")
    if not parallel.initialize(_DISTRIBUTED.value):  # before anything touches the devices
        parallel.split_cpu_into_devices(_BATCH_SIZE.value)  # a CPU: one device per core
    cache.enable_compilation_cache()
    params, config, step = generation.load_checkpoint(_WORKDIR.value or _CHECKPOINT.value)
    config_checks.check_config(config, "sample")
    spec = sampler_spec.from_flags(config, labels=parse_labels(_LABELS.value))
    out = _OUT.value or generation.default_out(_WORKDIR.value, spec)
    logging.info("Checkpoint step %d: %s (%s).", step, spec.describe(), spec.to_json())
    path = generation.generate_samples(
        params, config, out, spec, num_samples=_NUM_SAMPLES.value, batch_size=_BATCH_SIZE.value,
        seed=_SEED.value, trajectory=_TRAJECTORY.value, checkpoint_step=step,
    )
    logging.info("Wrote %s", path)


def run() -> None:
    """Console-script entry point (`ddpm-sample`)."""
    cli.run(main, "ddpm_jax.sample")


if __name__ == "__main__":
    run()
