"""`python -m ddpm_jax.evaluate --workdir=runs/cifar10 --metrics=fid,is --num_samples=50000`.

Scores a run the way the literature does (see ``ddpm_jax.evaluation``):

1. draws exactly ``--num_samples`` samples from the EMA params of the latest checkpoint (or
   ``--checkpoint``) with the config's sampler or ``--sampler/--steps/--eta`` (and classifier-free
   guidance ``--guidance=w`` and ``--guidance_interval``, default the config's), through the sample
   program's resumable chunks (``<workdir>/samples_<sampler>_<steps>``, or ``--out``): a rerun
   after a preemption reuses every finished chunk; or scores an existing ``--samples`` NPZ
   (uint8 NHWC under "arr_0", + "labels"), e.g. from another tool;
2. extracts features (FID Inception-v3 for fid/is/kid, under ``--convention``) and compares them
   with the reference (``--reference``; default the config's training split, cached);
3. ``bpd`` computes the variational bound in bits/dim on ``--bpd_split`` (all T terms);
4. writes ``<workdir>/eval/<step>_<protocol>.json`` (or ``<samples>.eval.json``) and TensorBoard
   scalars under ``<workdir>/eval``, and prints one line per figure saying what it means.

With only ``--reference`` and ``--image_size`` it computes the reference statistics (cached under
``$DDPM_JAX_CACHE/reference``) and prints their path. The CIFAR-10 paper protocol (FID 3.17,
IS 9.46):
    python -m ddpm_jax.evaluate --workdir=runs/cifar10 --metrics=fid,is,kid \
        --num_samples=50000 --sampler=ddpm --steps=1000 --reference=cifar10:train
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import jax
from absl import app, flags

from ddpm_jax import (
    cache,
    cli,
    config_checks,
    evaluation,
    generation,
    input_files,
    parallel,
    sampler_spec,
    summary,
)
from ddpm_jax.models import unet_from_config

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir: evaluate its latest checkpoint.",
                               allow_override=True)
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "One checkpoint step directory (e.g. <workdir>/checkpoints/800000).",
    allow_override=True,
)
_SAMPLES = flags.DEFINE_string(
    "samples", None, "Score this NPZ of uint8 NHWC samples ('arr_0', optional 'labels') instead "
    "of sampling a checkpoint.",
)
_METRICS = flags.DEFINE_string(
    "metrics", "fid,is", f"Comma-separated, from: {', '.join(evaluation.METRICS)}."
)
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 50_000, "Samples to draw and score.",
                                    allow_override=True)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 256, "Sampling batch (padded to a multiple of "
                                   "the devices if it is not one).", lower_bound=1,
                                   allow_override=True)
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.", allow_override=True)
_OUT = flags.DEFINE_string("out", None, "Sample directory (default: <workdir>/samples_<sampler>_"
                           "<steps>[_...], shared with ddpm_jax.sample).", allow_override=True)
sampler_spec.define_flags()  # --sampler, --steps, --eta, ..., --guidance, --guidance_interval
flags.adopt_module_key_flags(sampler_spec)  # listed by --help
_CONVENTION = flags.DEFINE_enum(
    "convention", "tf", ["tf", "pytorch-fid"],
    "Inception input convention: tf (TF1 legacy bilinear resize, the DDPM paper's TF-GAN protocol) "
    "or pytorch-fid (half-pixel bilinear).",
)
_REFERENCE = flags.DEFINE_string(
    "reference", None, "Reference set: TFDS 'name:split' (e.g. cifar10:train), 'folder:/path', an "
    "images .npz, or a statistics .npz (mu, sigma). Default: the config's training split.",
)
_INCEPTION_WEIGHTS = flags.DEFINE_string(
    "inception_weights", None, "FID Inception weights (.npz converted by `python -m "
    "ddpm_jax.convert --inception`, or the .pth with torch). Default: $DDPM_JAX_INCEPTION_WEIGHTS.",
)
_FEATURE_BATCH = flags.DEFINE_integer("feature_batch_size", 200, "Inception batch (padded to a "
                                      "multiple of the devices if it is not one).", lower_bound=1)
_CACHE_DIR = flags.DEFINE_string("cache_dir", None, "Cache of reference statistics and the digits "
                                 "classifier (default: $DDPM_JAX_CACHE or ~/.cache/ddpm_jax).")
_IMAGE_SIZE = flags.DEFINE_integer(
    "image_size", None, "With only --reference: the model's image size (TFDS and folder images "
    "are center-cropped and resized to it, as for training).",
)
_NUM_CHANNELS = flags.DEFINE_integer("num_channels", 3, "With only --reference: 1 or 3.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "With only --reference: the TFDS data_dir.")
_BPD_SPLIT = flags.DEFINE_string("bpd_split", "test", "Data split of the bpd metric.")
_BPD_NUM_IMAGES = flags.DEFINE_integer("bpd_num_images", None, "Only the first N images of "
                                       "--bpd_split (default: all).")
_BPD_BATCH = flags.DEFINE_integer("bpd_batch_size", 64, "bits/dim batch (padded to a multiple of "
                                  "the devices if it is not one).", lower_bound=1)
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", None, "Call jax.distributed.initialize() (default: when the environment shows "
    "several processes).", allow_override=True,
)


def _score_samples(scorer: evaluation.SampleScorer, path: Path) -> None:
    samples = input_files.open_samples(path)
    count, batches = samples.shapes["arr_0"][0], input_files.iter_rows(samples, "arr_0", 1000)
    labels = samples.load("labels") if "labels" in samples.files else None

    def with_labels():
        start = 0
        for images in batches:
            yield images, None if labels is None else labels[start:start + len(images)]
            start += len(images)

    scorer.add_all(with_labels(), count)


def _reference_only() -> None:
    """Computes (or finds in the cache) the reference statistics and prints where they are."""
    import ml_collections

    from ddpm_jax.metrics import inception, reference

    if not parallel.initialize(_DISTRIBUTED.value):
        parallel.split_cpu_into_devices(_FEATURE_BATCH.value)  # a CPU: one device per core
    cache.enable_compilation_cache()
    config_checks.check_value("data.image_size", _IMAGE_SIZE.value, name="--image_size")
    config_checks.check_value("data.num_channels", _NUM_CHANNELS.value, name="--num_channels")
    data_config = ml_collections.ConfigDict(dict(
        dataset="", split="train", data_dir=_DATA_DIR.value, image_size=_IMAGE_SIZE.value,
        num_channels=_NUM_CHANNELS.value,
    ))
    extractor = evaluation.inception_extractor(
        inception.load_variables(_INCEPTION_WEIGHTS.value), _CONVENTION.value,
        parallel.make_data_mesh(), _FEATURE_BATCH.value,
    )
    ref = reference.get_reference(_REFERENCE.value, data_config, extractor, _CONVENTION.value,
                                  need_features=True, cache_dir=_CACHE_DIR.value)
    path = reference.cache_path(_REFERENCE.value, _IMAGE_SIZE.value, _CONVENTION.value,
                                _CACHE_DIR.value or cache.root())
    if jax.process_index() == 0:
        print(f"Reference statistics of {ref.description} ({ref.metadata.get('num_images')} "
              f"images, {_CONVENTION.value} convention): {path}")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    sources = [f for f in (_WORKDIR, _CHECKPOINT) if f.value is not None]
    if len(sources) > 1:
        raise app.UsageError("Pass at most one of --workdir and --checkpoint.")
    if not sources and _SAMPLES.value is None:
        if _REFERENCE.value is not None and _IMAGE_SIZE.value is not None:
            return _reference_only()
        raise app.UsageError("Pass --workdir (or --checkpoint), or --samples=FILE.npz; or, to "
                             "compute reference statistics only, --reference and --image_size.")
    if _CHECKPOINT.value is not None and _OUT.value is None:
        raise app.UsageError("With --checkpoint, pass --out too.")
    metrics = evaluation.parse_metrics(_METRICS.value)  # a ValueError naming the choices
    if _SAMPLES.value is not None and not os.path.isfile(_SAMPLES.value):
        raise FileNotFoundError(f"--samples={_SAMPLES.value} does not exist.")
    samples = None if _SAMPLES.value is None else input_files.open_samples(_SAMPLES.value)
    if "bpd" in metrics and not sources:
        raise app.UsageError("bpd needs a model: pass --workdir or --checkpoint.")
    if not parallel.initialize(_DISTRIBUTED.value):  # a CPU: one device per core dividing both
        parallel.split_cpu_into_devices(math.gcd(_BATCH_SIZE.value, _FEATURE_BATCH.value,
                                                 _BPD_BATCH.value))
    cache.enable_compilation_cache()
    mesh = parallel.make_data_mesh()

    params = config = step = None
    if sources:
        params, config, step = generation.load_checkpoint(sources[0].value)
        config_checks.check_config(config, "evaluate")
    else:
        import ml_collections

        shape = samples.shapes["arr_0"]
        config = ml_collections.ConfigDict({"data": {
            "dataset": "", "split": "train", "image_size": shape[1], "num_channels": shape[-1]}})
        if any(m in metrics for m in ("fid", "kid")) and _REFERENCE.value is None:
            raise app.UsageError("With --samples, pass --reference for fid/kid.")

    results: list[tuple[dict[str, float], evaluation.Protocol]] = []
    sample_metrics = [m for m in metrics if m in evaluation.SAMPLE_METRICS]
    # The sampling setting's errors come before the metric's reference is computed or cached.
    spec = sampler_spec.from_flags(config) if sample_metrics and _SAMPLES.value is None else None
    if sample_metrics:
        scorer = evaluation.SampleScorer(
            sample_metrics, config.data, mesh, convention=_CONVENTION.value,
            reference=_REFERENCE.value, inception_weights=_INCEPTION_WEIGHTS.value,
            feature_batch_size=_FEATURE_BATCH.value, cache_dir=_CACHE_DIR.value,
        )
        if _SAMPLES.value is not None:
            samples_path = Path(_SAMPLES.value)
        else:
            out = _OUT.value or generation.default_out(_WORKDIR.value, spec)
            samples_path = generation.generate_samples(
                params, config, out, spec, num_samples=_NUM_SAMPLES.value,
                batch_size=_BATCH_SIZE.value, seed=_SEED.value, checkpoint_step=step,
            )
        _score_samples(scorer, samples_path)
        results.append((scorer.result(), scorer.protocol(spec, checkpoint_step=step)))
    if "bpd" in metrics:
        model = unet_from_config(config.model, config.data.num_channels)
        bpd, count = evaluation.bits_per_dim_on_split(
            params, model, config, mesh, split=_BPD_SPLIT.value, batch_size=_BPD_BATCH.value,
            num_images=_BPD_NUM_IMAGES.value,
        )
        results.append(({"bpd": bpd}, evaluation.Protocol(
            num_samples=count, checkpoint_step=step,
            reference=f"{config.data.dataset}:{_BPD_SPLIT.value}",
        )))

    if sources:
        workdir = Path(_WORKDIR.value or _OUT.value)
        results_path = workdir / "eval" / f"{step}_{results[0][1].tag()}.json"
        writer = summary.SummaryWriter(workdir / "eval")
        for values, protocol in results:
            writer.scalars(step, {f"{k}@{protocol.tag()}": v for k, v in values.items()})
        writer.close()
    else:
        results_path = Path(str(_SAMPLES.value) + ".eval.json")
    evaluation.write_results(results_path, results)
    if jax.process_index() == 0:
        for values, protocol in results:
            print(evaluation.describe(values, protocol))
        print(f"Wrote {results_path}")


def run() -> None:
    """Console-script entry point (`ddpm-evaluate`)."""
    cli.run(main, "ddpm_jax.evaluate")


if __name__ == "__main__":
    run()
