"""Classifier-free guidance settings of a digits model, scored with the offline digits metric.

    python benchmarks/guidance_sweep.py --workdir=runs/mnist5k --num_samples=2000 \
        --settings="0;0.5;1@400,999;2"

For each setting ``w`` or ``w@t_min,t_max`` (guidance only at those timesteps) it draws
``--num_samples`` samples exactly as ``python -m ddpm_jax.evaluate --metrics=digits --guidance=w
--guidance_interval=t_min,t_max`` does (the same resumable sample directories under the workdir,
the same keys for every setting: differences between rows come from the setting alone), scores
them with ``ddpm_jax.metrics.digits`` and prints one Markdown table row per setting (digits FD,
label accuracy, class coverage, seconds spent sampling), ready for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import math
import time

import jax
import numpy as np
from absl import app, flags

from ddpm_jax import cache, cli, generation, parallel, sampler_spec
from ddpm_jax.metrics import digits

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir of a digits model.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 2000, "Samples per setting.")
_BATCH = flags.DEFINE_integer("batch_size", 100, "Sampling batch (multiple of the devices).")
_SETTINGS = flags.DEFINE_string(
    "settings", "0;0.5;1;2;4", "';'-separated guidance settings: w, or w@t_min,t_max."
)
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed (as ddpm_jax.evaluate's --seed).")


def parse_setting(text: str) -> tuple[float, str | None]:
    """'1' -> (1.0, None); '1@400,999' -> (1.0, '400,999')."""
    scale, _, interval = text.strip().partition("@")
    return float(scale), interval or None


def main(argv: list[str]) -> None:
    del argv
    if _WORKDIR.value is None:
        raise app.UsageError("Pass --workdir=<a digits training run>.")
    parallel.split_cpu_into_devices(_BATCH.value)
    cache.enable_compilation_cache()
    params, config, step = generation.load_checkpoint(_WORKDIR.value)
    settings = [parse_setting(s) for s in _SETTINGS.value.split(";")]
    specs = [sampler_spec.from_config(config, dict(
        guidance=w, guidance_interval=interval or sampler_spec.ALL_STEPS))
        for w, interval in settings]  # every bad setting fails before any sampling
    classifier = digits.load_classifier()
    device = f"{jax.device_count()} x {jax.devices()[0].device_kind}"
    unguided = sampler_spec.from_config(config, dict(guidance=0.0))
    print(f"{_WORKDIR.value}, checkpoint {step}: {_NUM_SAMPLES.value} samples per row, "
          f"{unguided.describe()}, seed {_SEED.value}, {device}, jax {jax.__version__}")
    print("| w | guided t | digits FD | label accuracy | class coverage | sampling s |")
    print("|---|---|---|---|---|---|")
    for spec in specs:
        out = generation.default_out(_WORKDIR.value, spec)
        start = time.perf_counter()
        path = generation.generate_samples(
            params, config, out, spec, num_samples=_NUM_SAMPLES.value, batch_size=_BATCH.value,
            seed=_SEED.value, checkpoint_step=step,
        )
        seconds = time.perf_counter() - start
        with np.load(path) as f:
            m = digits.digits_metrics(f["arr_0"], f["labels"], classifier)
        w, interval = spec.guidance, spec.guidance_interval
        guided = "-" if not w else (f"{interval[0]}-{interval[1]}" if interval else "all")
        print(f"| {w:g} | {guided} | {m['digits_fd']:.2f} | {m['digits_accuracy']:.3f} | "
              f"{m['class_coverage']:.4f} | {math.ceil(seconds)} |", flush=True)


if __name__ == "__main__":
    cli.run(main, "guidance_sweep")
