"""Scoring a model: FID / IS / KID in Inception features, the offline digits metric, bits/dim.

Shared by ``python -m ddpm_jax.evaluate`` and the trainer's periodic evaluation. Every figure is
reported with what it means (``Protocol``): sample count, sampler and steps, input convention and
reference set, because FID@5k is not FID@50k and a `tf` FID is not a `pytorch-fid` one.

* ``fid``, ``is``, ``kid``: the FID Inception-v3 (``metrics.inception``; weights from
  ``--inception_weights`` or ``$DDPM_JAX_INCEPTION_WEIGHTS``) on uint8 samples; FID against
  reference statistics (``metrics.reference``), IS with 10 splits, KID with subsets of 1000.
* ``digits``: for 28x28 grayscale digit models, the Fréchet distance in the feature space of a
  digit classifier the project trains itself on mnist5k, the accuracy of class-conditional
  samples on their labels, and class coverage (``metrics.digits``). Not FID.
* ``bpd``: the negative variational bound in bits/dim on a data split, all T terms.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from ddpm_jax import diffusion, files, generation, keys, parallel, sampler_spec, sampling
from ddpm_jax.metrics import features as features_lib
from ddpm_jax.metrics import reference as reference_lib
from ddpm_jax.metrics import statistics

PyTree = Any
INCEPTION_METRICS = ("fid", "is", "kid")
SAMPLE_METRICS = (*INCEPTION_METRICS, "digits")
METRICS = (*SAMPLE_METRICS, "bpd")
# The figure each metric is judged by, and whether lower is better (for the best checkpoint).
HEADLINE = {"fid": ("fid", True), "is": ("is", False), "kid": ("kid", True),
            "digits": ("digits_fd", True), "bpd": ("bpd", True)}


def parse_metrics(text: str | Iterable[str]) -> tuple[str, ...]:
    """"fid,is" -> ("fid", "is"), refusing unknown names."""
    names = [m.strip() for m in (text.split(",") if isinstance(text, str) else text) if m.strip()]
    unknown = [m for m in names if m not in METRICS]
    if unknown or not names:
        raise ValueError(f"Unknown metrics {unknown or names}: choose from {', '.join(METRICS)}.")
    return tuple(dict.fromkeys(names))


def default_reference(data_config: ml_collections.ConfigDict) -> str:
    """The training data as the reference set: ``<dataset>:<split>`` (e.g. cifar10:train)."""
    if data_config.dataset.startswith("folder:"):
        return data_config.dataset
    return f"{data_config.dataset}:{data_config.split}"


@dataclasses.dataclass(frozen=True)
class Protocol:
    """What a figure means: how the samples were drawn and what they were compared with."""

    num_samples: int
    spec: sampler_spec.SamplerSpec | None = None  # how the samples were drawn; None: --samples
    checkpoint_step: int | None = None
    convention: str | None = None  # Inception metrics only
    reference: str | None = None
    reference_images: int | None = None

    def tag(self) -> str:
        """A short name for file names and TensorBoard, e.g. ``50000_ddpm1000_tf``."""
        parts = [str(self.num_samples)]
        if self.spec:
            parts.append(self.spec.tag())
        if self.convention:
            parts.append(self.convention)
        return "_".join(parts)

    def to_json(self) -> dict[str, Any]:
        """The record of a results file: the fields, the sampling ones flat
        (``SamplerSpec.summary``; None when nothing was sampled)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        spec = fields.pop("spec")
        sampled = spec.summary() if spec else dict.fromkeys(sampler_spec.summary_keys())
        return {**fields, **sampled}

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> Protocol:
        own = {f.name: record.get(f.name) for f in dataclasses.fields(cls) if f.name != "spec"}
        return cls(spec=sampler_spec.SamplerSpec.from_summary(record), **own)


def inception_extractor(
    variables: PyTree, convention: str, mesh: Mesh, batch_size: int
) -> features_lib.FeatureExtractor:
    """The FID Inception under ``convention`` as a sharded extractor of ``batch_size`` images."""
    from ddpm_jax.metrics import inception

    return features_lib.FeatureExtractor(
        inception.make_inception_fn(variables, convention), mesh, batch_size
    )


class SampleScorer:
    """Feed uint8 samples batch by batch (``add``); ``result()`` gives the requested metrics.

    Inception features are extracted as the batches arrive (float64 streaming moments for FID;
    IS logits, and pool features only when KID is asked for, are kept). The digits metric keeps
    the (small) images themselves.
    """

    def __init__(
        self,
        metrics: Iterable[str],
        data_config: ml_collections.ConfigDict,
        mesh: Mesh,
        *,
        convention: str = "tf",
        reference: str | None = None,
        inception_weights: str | None = None,
        feature_batch_size: int = 256,
        cache_dir: str | os.PathLike | None = None,
    ):
        self.metrics = tuple(m for m in parse_metrics(metrics) if m in SAMPLE_METRICS)
        self.convention = convention
        self.reference: reference_lib.Reference | None = None
        self._extractor = None
        self.reset()
        if any(m in INCEPTION_METRICS for m in self.metrics):
            from ddpm_jax.metrics import inception

            self._extractor = inception_extractor(
                inception.load_variables(inception_weights), convention, mesh, feature_batch_size
            )
            if "fid" in self.metrics or "kid" in self.metrics:
                self.reference = reference_lib.get_reference(
                    reference or default_reference(data_config), data_config, self._extractor,
                    convention, need_features="kid" in self.metrics, cache_dir=cache_dir,
                )
        if "digits" in self.metrics:
            from ddpm_jax.metrics import digits

            shape = (data_config.image_size, data_config.image_size, data_config.num_channels)
            if shape != digits.IMAGE_SHAPE:
                raise ValueError(
                    f"The digits metric is for 28x28x1 digit images; this model makes {shape}. "
                    "Use fid/is/kid."
                )
            self._classifier = digits.load_classifier(cache_dir)

    def reset(self) -> None:
        """Forget the samples added so far (the network, weights and reference stay)."""
        self._moments = statistics.RunningMoments()
        self._logits: list[np.ndarray] = []
        self._pool: list[np.ndarray] = []
        self._digits: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        self._count = 0

    def add(self, images: np.ndarray, labels: np.ndarray | None = None) -> None:
        """One batch of uint8 [n, H, W, C] samples (and their class labels, if conditional)."""
        self._count += len(images)
        if labels is not None:
            self._labels.append(np.asarray(labels))
        if "digits" in self.metrics:
            self._digits.append(np.asarray(images))
        if self._extractor is None:
            return
        for out in features_lib.rebatch([images], self._extractor.batch_size):
            features = self._extractor(out)
            self._moments.update(features[reference_lib.POOL_FEATURE])
            if "is" in self.metrics:
                self._logits.append(features["logits_unbiased"])
            if "kid" in self.metrics:
                self._pool.append(features[reference_lib.POOL_FEATURE].astype(np.float32))

    def add_all(self, batches: Iterable[tuple[np.ndarray, np.ndarray | None]], total: int) -> None:
        """Every (images, labels) batch, with a progress bar on process 0."""
        with tqdm(total=total, unit="img", desc="scoring", disable=jax.process_index() != 0) as bar:
            for images, labels in batches:
                self.add(images, labels)
                bar.update(len(images))

    def result(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if "fid" in self.metrics:
            out["fid"] = statistics.frechet_distance(
                self._moments.mean, self._moments.covariance, self.reference.mu,
                self.reference.sigma,
            )
        if "is" in self.metrics:
            out["is"], out["is_std"] = statistics.inception_score(np.concatenate(self._logits))
        if "kid" in self.metrics:
            ours, theirs = np.concatenate(self._pool), self.reference.features
            subset = min(1000, len(ours), len(theirs))
            out["kid"], out["kid_std"] = statistics.kernel_inception_distance(
                ours, theirs, subset_size=subset
            )
            out["kid_subset_size"] = subset
        if "digits" in self.metrics:
            from ddpm_jax.metrics import digits

            labels = np.concatenate(self._labels) if self._labels else None
            out.update(digits.digits_metrics(np.concatenate(self._digits), labels,
                                             self._classifier))
        return out

    def protocol(self, spec: sampler_spec.SamplerSpec | None = None,
                 checkpoint_step: int | None = None) -> Protocol:
        """The Protocol of the samples scored so far, drawn as ``spec`` says."""
        reference, reference_images = None, None
        if self.reference is not None:
            reference = self.reference.description
            reference_images = self.reference.metadata.get("num_images")
        elif "digits" in self.metrics:
            from ddpm_jax.metrics import digits

            reference, reference_images = digits.REFERENCE, digits.NUM_REFERENCE
        return Protocol(
            num_samples=self._count,
            convention=self.convention if self._extractor is not None else None,
            reference=reference,
            reference_images=None if reference_images is None else int(reference_images),
            spec=spec, checkpoint_step=checkpoint_step,
        )


def write_results(
    path: str | os.PathLike, results: list[tuple[dict[str, float], Protocol]]
) -> None:
    """Writes [{"metrics", "protocol"}, ...] as JSON (atomically; process 0 only)."""
    records = [{"metrics": m, "protocol": p.to_json()} for m, p in results]
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
        text = json.dumps(records, indent=2, sort_keys=True) + "\n"
        files.write_atomic(path, lambda f: f.write(text.encode()))


_LABELS = {"fid": "FID", "is": "IS", "kid": "KID", "bpd": "bits/dim", "digits_fd": "digits FD",
           "digits_accuracy": "label accuracy", "class_coverage": "class coverage"}


def describe(metrics: dict[str, float], protocol: Protocol) -> str:
    """One line a person reads, e.g. 'FID 3.17  IS 9.46 ± 0.11 (50000 samples, ddpm 1000
    steps, tf convention, vs cifar10:train [50000 images], checkpoint 800000)'."""
    shown = []
    for name, label in _LABELS.items():
        if name in metrics:
            std = metrics.get(f"{name}_std")
            shown.append(f"{label} {metrics[name]:.4g}" + (f" ± {std:.2g}" if std else ""))
    context = [f"{protocol.num_samples} samples"]
    if protocol.spec:
        context.append(protocol.spec.describe())
    if protocol.convention:
        context.append(f"{protocol.convention} convention")
    if protocol.reference:
        count = f" [{protocol.reference_images} images]" if protocol.reference_images else ""
        context.append(f"vs {protocol.reference}{count}")
    if protocol.checkpoint_step is not None:
        context.append(f"checkpoint {protocol.checkpoint_step}")
    return "  ".join(shown) + f" ({', '.join(context)})"


def read_results(path: str | os.PathLike) -> list[tuple[dict[str, float], Protocol]]:
    """The [(metrics, protocol)] of a results file written by ``write_results``."""
    with open(path) as f:
        return [(r["metrics"], Protocol.from_json(r["protocol"])) for r in json.load(f)]


# ----------------------------------------------------------------------------------------------
# Bits/dim on a data split.
# ----------------------------------------------------------------------------------------------
def make_bpd_fn(
    model: Any, config: ml_collections.ConfigDict, mesh: Mesh, timesteps_per_chunk: int = 10
) -> Callable[[PyTree, jax.Array, jax.Array, jax.Array | None], jax.Array]:
    """Jitted ``(params, uint8 images [B, ...], rng, labels) -> total bits/dim [B]`` (Ho et al.
    eq. 5 with the discretized decoder at t = 1), the batch split over ``mesh``."""
    sched = diffusion.schedule_from_config(config.diffusion)
    chunk = math.gcd(timesteps_per_chunk, sched.num_timesteps)
    batch_sharding = NamedSharding(mesh, P("data"))

    def bpd(params: PyTree, images: jax.Array, rng: jax.Array, labels: jax.Array | None):
        x0 = images.astype(jnp.float32) / 127.5 - 1.0
        model_fn = sampling.make_model_fn(model, params, labels)
        terms = diffusion.bits_per_dim(
            sched, model_fn, x0, rng, mean_type=config.diffusion.mean_type,
            var_type=config.diffusion.var_type, timesteps_per_chunk=chunk,
        )
        return terms["total_bpd"]

    return jax.jit(bpd, out_shardings=batch_sharding)


def bits_per_dim_on_split(
    params: PyTree,
    model: Any,
    config: ml_collections.ConfigDict,
    mesh: Mesh,
    *,
    split: str,
    batch_size: int,
    num_images: int | None = None,
    seed: int = 0,
) -> tuple[float, int]:
    """(mean bits/dim, image count) over ``split`` of the config's dataset (or its first
    ``num_images``); batch k draws its noise from fold_in(key(seed), k)."""
    from ddpm_jax import input_pipeline

    padded_size = parallel.padded_batch_size(batch_size, mesh.size, "--bpd_batch_size")
    count, examples = input_pipeline.iterate_split(config.data, split, batch_size)
    total = count if num_images is None else min(count, num_images)
    conditional = bool(config.model.get("num_classes"))
    bpd_fn = make_bpd_fn(model, config, mesh)
    params = jax.device_put(params, NamedSharding(mesh, P()))
    sharding = NamedSharding(mesh, P("data"))
    values = []

    def padded(x: np.ndarray) -> jax.Array:
        if len(x) < padded_size:  # a short last batch, or a batch the devices do not divide
            x = np.concatenate([x, np.zeros((padded_size - len(x), *x.shape[1:]), x.dtype)])
        return jax.make_array_from_callback(x.shape, sharding, lambda i: x[i])

    def batches() -> Iterator[dict[str, np.ndarray]]:
        left = total
        for example in examples:
            if left <= 0:
                return
            yield {k: v[:left] for k, v in example.items()}
            left -= len(example["image"])

    with tqdm(total=total, unit="img", desc="bits/dim", disable=jax.process_index() != 0) as bar:
        for k, example in enumerate(batches()):
            n = len(example["image"])
            labels = padded(example["label"]) if conditional else None
            out = bpd_fn(params, padded(example["image"]), jax.random.fold_in(
                jax.random.key(seed), k), labels)
            if jax.process_count() > 1:
                out = multihost_utils.process_allgather(out, tiled=True)
            values.append(np.asarray(out)[:n])
            bar.update(n)
    values = np.concatenate(values).astype(np.float64)
    return float(values.mean()), len(values)


# ----------------------------------------------------------------------------------------------
# Evaluation during training (config.eval).
# ----------------------------------------------------------------------------------------------
def training_eval_settings(config: ml_collections.ConfigDict) -> dict[str, Any] | None:
    """The trainer's evaluation settings from ``config.eval`` (None when it is off); its fields
    are checked at start (``config_checks``), before training, not hours into it."""
    eval_config = config.get("eval")
    if eval_config is None or not eval_config.get("every_steps"):
        return None
    metrics = parse_metrics(eval_config.metrics)
    spec = sampler_spec.from_config(config, eval_config)  # the eval section over the sample's
    return dict(metrics=metrics, spec=spec)


def make_training_evaluator(
    config: ml_collections.ConfigDict, model: Any, mesh: Mesh
) -> Callable[[PyTree, int], tuple[dict[str, float], Protocol]] | None:
    """``evaluate(ema_params, step) -> (metrics, protocol)`` for ``config.eval``, or None when it
    is off. Draws ``num_samples`` in memory (the same keys at every evaluation, so figures of
    different steps differ by the model only) and scores them."""
    settings = training_eval_settings(config)
    if settings is None:
        return None
    eval_config = config.eval
    scorer_kw = dict(
        convention=eval_config.get("convention") or "tf",
        reference=eval_config.get("reference"),
        inception_weights=eval_config.get("inception_weights"),
        feature_batch_size=eval_config.batch_size,
    )
    # Loads the weights, the classifier and the reference now: a missing file fails at start.
    scorer = SampleScorer(settings["metrics"], config.data, mesh, **scorer_kw)
    generate = generation.make_generate_fn(model, config, mesh, settings["spec"],
                                           batch_size=eval_config.batch_size)
    num_samples, batch_size = eval_config.num_samples, eval_config.batch_size
    root_key = keys.stream(config.seed, keys.EVAL)

    def evaluate(ema_params: PyTree, step: int) -> tuple[dict[str, float], Protocol]:
        scorer.reset()
        for chunk in range(math.ceil(num_samples / batch_size)):
            images, labels = generate(ema_params, root_key, np.int32(chunk))
            if jax.process_count() > 1:
                images, labels = multihost_utils.process_allgather((images, labels), tiled=True)
            n = min(batch_size, num_samples - chunk * batch_size)
            conditional = bool(config.model.get("num_classes"))
            scorer.add(np.asarray(images)[:n], np.asarray(labels)[:n] if conditional else None)
        return scorer.result(), scorer.protocol(settings["spec"], checkpoint_step=step)

    return evaluate
