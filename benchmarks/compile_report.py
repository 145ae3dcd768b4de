"""What XLA says the programs of a config cost, compiled for a chip, without running them.

    python benchmarks/compile_report.py --config=cifar10                       # local devices
    XLA_FLAGS=--xla_force_host_platform_device_count=8 \
        python benchmarks/compile_report.py --config=tiny                      # 8 fake CPUs
    python benchmarks/compile_report.py --config=cifar10 --topology=v5e:2x4 \
        --config.model.dtype=bfloat16 --programs=train --json=cifar10_v5e.json  # libtpu's venv
    python benchmarks/compile_report.py --markdown='reports/*.json'           # RESULTS.md rows

Compiles, with abstract inputs, exactly what ``python -m ddpm_jax.train`` (its train dispatch),
``python -m ddpm_jax.sample`` (the config's sampler, unguided, and guided for configs trained
with label dropout) and ``python -m ddpm_jax.evaluate`` (the FID Inception forward) run, for the
local devices or, with ``--topology``, for the compile-only devices of a TPU topology (needs
libtpu: ``pip install "jax[tpu]==<your jax version>"`` in a separate venv; a paper config's
train step takes 5-9 minutes and up to 9 GB of memory to compile on a 2-core host). Prints per
device and per program: memory and headroom against the chip's HBM, FLOPs and HBM bytes per
image next to the UNet's analytic FLOPs, the collectives per step (for the samplers, those in
the chain's loop body apart), compile time, and a roofline bound on images/s (a bound, not a
measurement). See ``ddpm_jax/program_costs.py`` for what is compiled and how it is counted.
"""

from __future__ import annotations

import glob
import json
import sys
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

from ddpm_jax import program_costs
from ddpm_jax import train as _train  # noqa: F401  (defines --config as the trainer takes it)

_TOPOLOGY = flags.DEFINE_string(
    "topology", None, "Compile for this TPU topology's compile-only devices (v5e:2x4, "
    "v4:2x2x2, v5p:2x2x1, v6e:2x4; needs libtpu) instead of the local devices.")
_PROGRAMS = flags.DEFINE_list(
    "programs", list(program_costs.PROGRAMS),
    f"Programs to compile, of {', '.join(program_costs.PROGRAMS)} (sample_guided only for "
    "configs with label dropout, model.p_uncond > 0; others skip it).")
_SAMPLE_BATCH = flags.DEFINE_integer(
    "sample_batch", program_costs.DEFAULT_SAMPLE_BATCH,
    "Sampling batch (python -m ddpm_jax.sample's --batch_size default).")
_INCEPTION_BATCH = flags.DEFINE_integer(
    "inception_batch", program_costs.DEFAULT_INCEPTION_BATCH,
    "FID Inception batch (python -m ddpm_jax.evaluate's --feature_batch_size default).")
_JSON = flags.DEFINE_string("json", None, "Also write the report as JSON to this file.")
_HLO_DIR = flags.DEFINE_string(
    "hlo_dir", None, "Also write each program's compiled HLO text to <dir>/<program>.hlo.txt.")
_MARKDOWN = flags.DEFINE_string(
    "markdown", None, "Compile nothing: print RESULTS.md table rows of these JSON reports "
    "(a glob, a directory or comma-separated files).")


def _config_name() -> str:
    """--config's value with its --config.* overrides, as given."""
    name = config_flags.get_config_filename(flags.FLAGS["config"])
    overrides = [a for a in sys.argv[1:] if a.startswith("--config.")]
    return " ".join([Path(name).stem if "/configs/" in name else name, *overrides])


def _print_markdown(pattern: str) -> None:
    paths = []
    for part in pattern.split(","):
        path = Path(part)
        paths += sorted(path.glob("*.json")) if path.is_dir() else sorted(
            Path(p) for p in glob.glob(part))
    if not paths:
        raise app.UsageError(f"--markdown={pattern!r} matches no JSON report.")
    print(program_costs.MARKDOWN_HEADER)
    for path in paths:
        report = json.loads(path.read_text())
        for result in report["programs"]:
            print(program_costs.markdown_row(report, result))


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if _MARKDOWN.value:
        _print_markdown(_MARKDOWN.value)
        return
    config = flags.FLAGS.config
    if _TOPOLOGY.value:
        devices = program_costs.topology_devices(_TOPOLOGY.value)  # before the backends start
    else:
        import jax

        devices = jax.devices()
    meta = program_costs.run_metadata(config, devices, _TOPOLOGY.value)
    name = _config_name()
    print(program_costs.format_header(meta, name), flush=True)

    if "sample_guided" in _PROGRAMS.value and not config.model.get("p_uncond"):
        print("\n[sample_guided] skipped: the config has no classifier-free guidance "
              "(model.p_uncond = 0)", flush=True)

    def show(result: dict) -> None:
        print("\n" + program_costs.format_program(result), flush=True)

    results = program_costs.report(
        config, devices, _PROGRAMS.value, sample_batch=_SAMPLE_BATCH.value,
        inception_batch=_INCEPTION_BATCH.value, hlo_dir=_HLO_DIR.value, on_program=show,
    )
    if _JSON.value:
        report = {"config": name, "command": " ".join(["python", *sys.argv]), "meta": meta,
                  "programs": results}
        Path(_JSON.value).parent.mkdir(parents=True, exist_ok=True)
        Path(_JSON.value).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    app.run(main)
