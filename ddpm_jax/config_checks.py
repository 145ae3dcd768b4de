"""What every config field takes, in one place, checked by every program at start (issue 22).

``FIELDS`` states for each field of a run config (``configs/_default.py``) its type and the values
it takes: a range, a set of choices, "a multiple of"; ``RELATIONS`` the rules that tie fields
together ("divides the batch", "ch·ch_mult a multiple of 32", ...). ``check_config(config,
program)`` applies the ones the program reads, before it writes anything: the trainer
(``training.train_and_evaluate``) all of them, ``ddpm_jax.sample`` and ``ddpm_jax.evaluate`` those
of the data shape, model and diffusion of the checkpoint's config. The first problem found is a
ValueError of one line naming the field, its value, what is allowed and a fix, which the programs
print as ``<program>: error: ...`` (``ddpm_jax.cli``). ml_collections' own type checking of
``--config.field=value`` overrides stays: this adds what a type cannot say, and checks config
files, which no override passes through.

The sampling fields (``SAMPLING_FIELDS``: sampler, steps, eta, guidance and its interval,
``diffusion.var_type``, and the eval section's sampler, steps and eta) are the sampler's own to
check: ``check_sampling_fields`` is the one hook that calls that validation.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal

import ml_collections
import numpy as np

from ddpm_jax import diffusion, evaluation, keys, sampler_spec, sampling
from ddpm_jax.metrics import inception
from ddpm_jax.models import unet

Program = Literal["train", "sample", "evaluate"]
PROGRAMS: tuple[Program, ...] = ("train", "sample", "evaluate")
TRAIN: tuple[Program, ...] = ("train",)
FOLDER_PREFIX = "folder:"  # input_pipeline.FOLDER_PREFIX, without importing TensorFlow


@dataclasses.dataclass(frozen=True)
class Field:
    """The values one config field takes. ``kind`` is int, float, str, bool or tuple (of ints);
    ``low``/``high`` bound a number or each item of a tuple (excluded when ``*_open``);
    ``choices`` lists the allowed strings (``comma_list``: a comma-separated list of them)."""

    path: str  # "optim.lr"
    kind: type
    meaning: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    multiple_of: int | None = None
    choices: tuple[Any, ...] | None = None
    comma_list: bool = False
    may_be_none: bool = False
    non_empty: bool = False  # str / tuple
    read_by: tuple[Program, ...] = PROGRAMS

    def allowed(self) -> str:
        """What the field takes, as the end of "... is not <allowed>"."""
        if self.choices is not None:
            text = ("a comma-separated list of " if self.comma_list else "one of ") + ", ".join(
                map(str, self.choices))
        elif self.kind is bool:
            text = "True or False"
        elif self.kind is str:
            text = "a non-empty string" if self.non_empty else "a string"
        else:
            noun = {int: "an integer", float: "a number"}.get(self.kind, "")
            if self.kind is tuple:
                noun = ("a non-empty " if self.non_empty else "a ") + "tuple of integers"
            if self.multiple_of:
                noun += f" multiple of {self.multiple_of}"
            bounds = []
            if self.low is not None:
                bounds.append(f"{'>' if self.low_open else '>='} {_number(self.low)}")
            if self.high is not None:
                bounds.append(f"{'<' if self.high_open else '<='} {_number(self.high)}")
            text = noun + (" " + " and ".join(bounds) if bounds else "")
        return ("None or " if self.may_be_none else "") + text

    def _in_range(self, x: float) -> bool:
        return ((self.low is None or (x > self.low if self.low_open else x >= self.low))
                and (self.high is None or (x < self.high if self.high_open else x <= self.high))
                and (not self.multiple_of or x % self.multiple_of == 0))

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.may_be_none
        if self.kind is bool:
            return isinstance(value, (bool, np.bool_))
        if self.kind is str:
            if not isinstance(value, str) or (self.non_empty and not value.strip()):
                return False
            if self.choices is None:
                return True
            items = [v.strip() for v in value.split(",")] if self.comma_list else [value]
            return all(item in self.choices for item in items) and all(items)
        if self.kind is tuple:
            if not isinstance(value, (tuple, list)) or (self.non_empty and not value):
                return False
            return all(_is_int(v) and self._in_range(v) for v in value)
        if self.kind is int:
            return _is_int(value) and self._in_range(value) and (
                self.choices is None or value in self.choices)
        return (_is_number(value) and math.isfinite(value)) and self._in_range(value)

    def out_of_range(self) -> list[Any]:
        """Values of the field's own type that it does not take (for tests and examples)."""
        if self.choices is not None and self.kind is str:
            return ["nonsense", ""] + ([f"{self.choices[0]},nonsense"] if self.comma_list else [])
        if self.choices is not None:
            return sorted(set(range(min(self.choices) - 1, max(self.choices) + 2))
                          - set(self.choices))
        if self.kind in (bool, str):
            return [""] if self.non_empty else []
        values: list[Any] = []
        if self.low is not None:
            values.append(self.low if self.low_open else self.low - 1)
        if self.high is not None:
            values.append(self.high if self.high_open else self.high + 1)
        if self.multiple_of:
            values.append((self.low or 0) + self.multiple_of + 1)
        if self.kind is float:
            values += [math.nan, math.inf]
        elif self.kind is int:
            values = [int(v) for v in values]
        if self.kind is tuple:
            values = [(int(v),) for v in values] + ([()] if self.non_empty else [])
        return values


def _number(x: float) -> str:
    """0 for 0.0, 9223372036854775807 for that int, 1e-08 for that float."""
    return str(x) if isinstance(x, int) else f"{x:g}"


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_))


def _probability(path: str, meaning: str, **kw: Any) -> Field:
    return Field(path, float, meaning, low=0.0, high=1.0, high_open=True, **kw)


FIELDS: tuple[Field, ...] = (
    Field("seed", int, "the run's root seed", low=0, high=2**63 - 1, read_by=TRAIN),
    # data
    Field("data.dataset", str, "the dataset: a TFDS name, 'mnist5k' or 'folder:/path/to/images'",
          non_empty=True),
    Field("data.split", str, "the TFDS split to train on, e.g. 'train'", non_empty=True,
          read_by=TRAIN),
    Field("data.data_dir", str, "the TFDS data directory (None: TFDS's default)",
          may_be_none=True, non_empty=True),
    Field("data.image_size", int, "the side of the square training images, in pixels", low=1),
    Field("data.num_channels", int, "the image channels: 1 (grayscale) or 3 (RGB)", choices=(1, 3)),
    Field("data.random_flip", bool, "the switch of random horizontal flips in training",
          read_by=TRAIN),
    Field("data.batch_size", int, "the global training batch", low=1, read_by=TRAIN),
    Field("data.shuffle_buffer", int, "the size of tf.data's shuffle buffer, in examples", low=1,
          read_by=TRAIN),
    Field("data.class_conditional", bool, "the switch that makes training read class labels"),
    # model
    Field("model.ch", int, "the UNet's base width", low=unet.NUM_GROUPS,
          multiple_of=unet.NUM_GROUPS),
    Field("model.ch_mult", tuple, "the width multiplier of each resolution level", low=1,
          non_empty=True),
    Field("model.num_res_blocks", int, "the number of ResNet blocks per level", low=1),
    Field("model.attn_resolutions", tuple, "the resolutions with self-attention", low=1),
    _probability("model.dropout", "the dropout rate"),
    Field("model.resamp_with_conv", bool,
          "the switch of 3x3 convolutions around down- and upsampling"),
    Field("model.num_classes", int, "the number of classes of a class-conditional model (None: "
          "unconditional)", low=1, may_be_none=True),
    _probability("model.p_uncond", "the probability that training drops a label (classifier-free "
                 "guidance)"),
    Field("model.dtype", str, "the compute dtype", choices=("float32", "bfloat16", "float16")),
    Field("model.remat", str, "the rematerialisation policy", choices=tuple(unet.REMAT_POLICIES)),
    # diffusion
    Field("diffusion.schedule", str, "the β schedule", choices=diffusion.SCHEDULES),
    # At most 100,000: its tables are float64 arrays of T entries, built by every program at
    # start (1e9 steps would need gigabytes before any check could finish).
    Field("diffusion.num_timesteps", int, "T, the length of the diffusion", low=1, high=100_000),
    Field("diffusion.beta_start", float, "β_1, the first noise variance", low=0.0, high=1.0,
          low_open=True),
    Field("diffusion.beta_end", float, "β_T, the last noise variance", low=0.0, high=1.0,
          low_open=True),
    Field("diffusion.mean_type", str, "the network's target", choices=diffusion.MEAN_TYPES),
    # optim
    # No upper bound: tests diverge a run on purpose with lr 1e30.
    Field("optim.lr", float, "Adam's peak learning rate", low=0.0, low_open=True, read_by=TRAIN),
    Field("optim.warmup_steps", int, "the number of steps of learning-rate warm-up", low=0,
          read_by=TRAIN),
    Field("optim.grad_clip", float, "the gradient-norm clip (0: no clipping)", low=0.0,
          may_be_none=True, read_by=TRAIN),
    Field("optim.clip_groups", int, "the number of groups of the batch clipped apart", low=1,
          read_by=TRAIN),
    _probability("optim.b1", "Adam's β1", read_by=TRAIN),
    _probability("optim.b2", "Adam's β2", read_by=TRAIN),
    Field("optim.eps", float, "Adam's ε", low=0.0, low_open=True, read_by=TRAIN),
    # train
    Field("train.num_steps", int, "the number of training steps", low=0, read_by=TRAIN),
    Field("train.log_every", int, "the steps between log lines", low=1, read_by=TRAIN),
    Field("train.checkpoint_every", int, "the steps between checkpoints", low=1, read_by=TRAIN),
    Field("train.keep_checkpoints", int, "the number of latest checkpoints kept (None: all)",
          low=1, may_be_none=True, read_by=TRAIN),
    Field("train.keep_period", int, "the period of the checkpoints kept for good, in steps (0: "
          "none)", low=0, may_be_none=True, read_by=TRAIN),
    Field("train.sample_every", int, "the steps between sample grids (0: none)", low=0,
          may_be_none=True, read_by=TRAIN),
    _probability("train.ema_decay", "the EMA decay of the params", read_by=TRAIN),
    Field("train.steps_per_dispatch", int, "the number of train steps per host dispatch", low=1,
          read_by=TRAIN),
    Field("train.prng_impl", str, "the PRNG of the run's key", choices=keys.IMPLS, read_by=TRAIN),
    # sample (its sampling fields: SAMPLING_FIELDS)
    Field("sample.clip_denoised", bool, "the switch that clips the predicted x_0 to [-1, 1]",
          read_by=TRAIN),
    Field("sample.num_images", int, "the number of images of each training grid", low=1,
          read_by=TRAIN),
    # eval (its sampling fields: SAMPLING_FIELDS)
    Field("eval.every_steps", int, "the steps between evaluations in training (0: none)", low=0,
          read_by=TRAIN),
    Field("eval.metrics", str, "the metrics of evaluations in training (bpd: only `python -m "
          "ddpm_jax.evaluate --metrics=bpd`)", choices=evaluation.SAMPLE_METRICS,
          comma_list=True, read_by=TRAIN),
    Field("eval.num_samples", int, "the number of samples per evaluation", low=2, read_by=TRAIN),
    Field("eval.batch_size", int, "the sampling batch of evaluations", low=1, read_by=TRAIN),
    Field("eval.convention", str, "the Inception input convention", choices=inception.CONVENTIONS,
          read_by=TRAIN),
    Field("eval.reference", str, "the reference set (None: the training data)", may_be_none=True,
          non_empty=True, read_by=TRAIN),
    Field("eval.inception_weights", str, "the FID Inception weights (None: "
          f"${inception.WEIGHTS_ENV})", may_be_none=True, non_empty=True, read_by=TRAIN),
    Field("eval.keep_best", bool, "the switch that keeps the best evaluation's params",
          read_by=TRAIN),
)
# Checked by the sampler's own validation, through check_sampling_fields.
SAMPLING_FIELDS = (
    "sample.sampler", "sample.num_steps", "sample.guidance", "sample.guidance_interval",
    "diffusion.var_type", "eval.sampler", "eval.num_steps",
    *(f"{section}.{option}" for section in ("sample", "eval") for option in sampling.OPTIONS),
)
FIELD = {f.path: f for f in FIELDS}


class _Missing(Exception):
    """A field the config does not have (an older checkpoint's config, a section alone)."""


def _get(config: ml_collections.ConfigDict, path: str) -> Any:
    node: Any = config
    for part in path.split("."):
        if not isinstance(node, (ml_collections.ConfigDict, Mapping)) or part not in node:
            raise _Missing(path)
        node = node[part]
    return node


def _default(path: str) -> Any:
    from ddpm_jax.configs import _default as default_config

    try:
        return _get(default_config.get_config(), path)
    except _Missing:
        return None


def _flag_text(value: Any) -> str:
    """``value`` as ``--config.field=`` takes it: (16,) for a tuple, 'linear' for a string."""
    if isinstance(value, tuple):
        return "(" + ",".join(map(str, value)) + ("," if len(value) == 1 else "") + ")"
    return repr(value)


CHECKPOINT_FIX = "The checkpoint's config.json holds it: fix that file, or retrain."


def field_error(field: Field, value: Any, fix: str | None = None) -> str:
    """The one-line message for ``value`` of ``field``: what it is, what is allowed, and ``fix``
    (default: the override that sets the default value)."""
    if fix is None:
        example = _default(field.path)
        fix = "" if example is None else (
            f"Set it, e.g. --config.{field.path}={_flag_text(example)} (the default).")
    return (f"config.{field.path}={value!r} is not {field.allowed()}. It is {field.meaning}."
            + (f" {fix}" if fix else ""))


def check_value(path: str, value: Any, *, name: str | None = None) -> None:
    """Raises ValueError unless ``value`` is one the field ``path`` takes; ``name`` replaces
    ``config.<path>`` in the message (a program flag standing for that field, ``--image_size``)."""
    field = FIELD[path]
    if not field.accepts(value):
        if name is None:
            raise ValueError(field_error(field, value))
        raise ValueError(f"{name}={value!r} is not {field.allowed()}. It is {field.meaning}.")


# ----------------------------------------------------------------------------------------------
# Relations between fields. Each yields the messages of what it finds wrong; one that reads a
# field the config lacks is skipped.
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Relation:
    check: Callable[..., Iterator[str]]
    read_by: tuple[Program, ...] = PROGRAMS
    needs_devices: bool = False


def check_batch_size(batch_size: int, device_count: int) -> None:
    """Raises ValueError unless the global batch splits evenly over `device_count` devices."""
    if batch_size <= 0 or batch_size % device_count:
        raise ValueError(
            f"config.data.batch_size={batch_size} must be a positive multiple of the number of "
            f"devices ({device_count}): every device gets the same share of the global batch."
        )


def check_clip_groups(groups: int, batch_size: int, device_count: int) -> None:
    """Raises ValueError unless ``groups`` (config.optim.clip_groups) splits the batch evenly and
    lays out over the devices: several whole groups per device, or one group over several."""
    if groups < 1 or batch_size % groups:
        raise ValueError(
            f"config.optim.clip_groups={groups} must be >= 1 and divide config.data.batch_size="
            f"{batch_size} (each group's gradient is clipped, then they are averaged)."
        )
    if groups > 1 and groups % device_count and device_count % groups:
        choices = sorted(g for g in range(1, batch_size + 1) if batch_size % g == 0
                         and (g % device_count == 0 or device_count % g == 0))
        raise ValueError(
            f"config.optim.clip_groups={groups} must be 1, a multiple or a divisor of the device "
            f"count ({device_count}): each device clips its own groups' gradients, or a group "
            f"spans whole devices. With config.data.batch_size={batch_size} these work: "
            f"{', '.join(map(str, choices))}."
        )


def _errors_of(check: Callable[[], None]) -> Iterator[str]:
    try:
        check()
    except ValueError as e:
        yield str(e)


def _devices(c: ml_collections.ConfigDict, device_count: int, process_count: int) -> Iterator[str]:
    yield from _errors_of(lambda: check_batch_size(_get(c, "data.batch_size"), device_count))
    if _get(c, "data.batch_size") % process_count:
        yield (f"config.data.batch_size={_get(c, 'data.batch_size')} must be divisible by the "
               f"number of processes ({process_count}): each loads an equal share of the batch.")
    yield from _errors_of(lambda: check_clip_groups(
        _get(c, "optim.clip_groups"), _get(c, "data.batch_size"), device_count))


def _model_shape(c: ml_collections.ConfigDict) -> Iterator[str]:
    """The UNet's widths, levels and attention resolutions against the image size."""
    ch, ch_mult = _get(c, "model.ch"), tuple(_get(c, "model.ch_mult"))
    bad = [ch * m for m in ch_mult if (ch * m) % unet.NUM_GROUPS]
    if bad:
        yield (f"config.model.ch={ch} times config.model.ch_mult={ch_mult} gives widths {bad} that "
               f"are not multiples of the {unet.NUM_GROUPS} GroupNorm groups: choose ch_mult so "
               f"that every ch*m is one.")
    size, levels = _get(c, "data.image_size"), len(ch_mult)
    factor = 2 ** (levels - 1)
    if size % factor:
        fits = [s for s in (size // factor * factor, (size // factor + 1) * factor) if s > 0]
        yield (f"config.data.image_size={size} must be a multiple of {factor}: the UNet of "
               f"config.model.ch_mult={ch_mult} halves it {levels - 1} times and doubles it back. "
               f"Use image_size={' or '.join(map(str, fits))}, or fewer levels in ch_mult.")
        return
    resolutions = [size // 2**i for i in range(levels)]
    extra = sorted(set(_get(c, "model.attn_resolutions")) - set(resolutions))
    if extra:
        yield (f"config.model.attn_resolutions={tuple(_get(c, 'model.attn_resolutions'))} names "
               f"{extra}, which the UNet never has: its resolutions are {resolutions} "
               f"(config.data.image_size={size}, {levels} levels of config.model.ch_mult).")


def _classes(c: ml_collections.ConfigDict) -> Iterator[str]:
    num_classes, p_uncond = _get(c, "model.num_classes"), _get(c, "model.p_uncond")
    if p_uncond > 0 and num_classes is None:
        yield (f"config.model.p_uncond={p_uncond} (label dropout for classifier-free guidance) "
               "needs a class-conditional model: set config.model.num_classes, or p_uncond=0.")


def _class_conditional(c: ml_collections.ConfigDict) -> Iterator[str]:
    num_classes, class_conditional = (_get(c, "model.num_classes"),
                                      _get(c, "data.class_conditional"))
    if (num_classes is not None) != bool(class_conditional):
        yield (f"config.model.num_classes={num_classes} and config.data.class_conditional="
               f"{class_conditional} disagree: a class-conditional run sets both (e.g. "
               "num_classes=10 and class_conditional=True), an unconditional one num_classes=None "
               "and class_conditional=False.")


def _betas(c: ml_collections.ConfigDict) -> Iterator[str]:
    start, end = _get(c, "diffusion.beta_start"), _get(c, "diffusion.beta_end")
    if start > end:
        yield (f"config.diffusion.beta_start={start} must be <= config.diffusion.beta_end={end}: "
               "the noise grows along the chain.")


def _float16(c: ml_collections.ConfigDict) -> Iterator[str]:
    if _get(c, "model.dtype") == "float16":
        yield ("config.model.dtype=float16 has no loss scaling here, so small gradients would "
               "underflow to zero: use bfloat16 (same speed on TPUs and recent GPUs, float32's "
               "range) or float32.")


def _dispatch(c: ml_collections.ConfigDict) -> Iterator[str]:
    k = _get(c, "train.steps_per_dispatch")
    boundaries = {name: _get(c, name) or 0 for name in (
        "train.num_steps", "train.log_every", "train.checkpoint_every", "train.sample_every",
        "eval.every_steps")}
    unaligned = [f"config.{name}={value}" for name, value in boundaries.items() if value % k]
    if unaligned:  # a shorter dispatch would compile the step a second time
        yield (f"config.train.steps_per_dispatch={k} must divide {', '.join(unaligned)}: every "
               "dispatch runs the same number of steps, so the train step compiles once.")


def _data_files(c: ml_collections.ConfigDict) -> Iterator[str]:
    dataset = _get(c, "data.dataset")
    if dataset.startswith(FOLDER_PREFIX) and not os.path.isdir(dataset[len(FOLDER_PREFIX):]):
        yield (f"config.data.dataset={dataset!r}: {dataset[len(FOLDER_PREFIX):]!r} is not a "
               "directory. Give the folder of your images, e.g. folder:/data/my_images.")


def _eval_files(c: ml_collections.ConfigDict) -> Iterator[str]:
    """The files an evaluation in training reads: there at start, not hours into the run."""
    if not _get(c, "eval.every_steps"):
        return
    metrics = [m.strip() for m in _get(c, "eval.metrics").split(",")]
    if not set(metrics) & set(evaluation.INCEPTION_METRICS):
        return
    weights = _get(c, "eval.inception_weights") or os.environ.get(inception.WEIGHTS_ENV)
    if not weights:
        yield (f"config.eval.metrics={_get(c, 'eval.metrics')!r} needs the FID Inception weights: "
               f"set config.eval.inception_weights or ${inception.WEIGHTS_ENV} (`python -m "
               "ddpm_jax.convert --inception` makes them), or use the digits metric.")
    elif not os.path.isfile(weights):
        yield f"config.eval.inception_weights: {weights} does not exist or is not a file."
    reference = _get(c, "eval.reference")
    if reference and reference.endswith(".npz") and not os.path.isfile(reference):
        yield f"config.eval.reference={reference!r}: no such file."
    elif reference and reference.startswith(FOLDER_PREFIX) and not os.path.isdir(
            reference[len(FOLDER_PREFIX):]):
        yield f"config.eval.reference={reference!r}: no such directory."


RELATIONS: tuple[Relation, ...] = (
    Relation(_model_shape),
    Relation(_classes),
    Relation(_class_conditional),
    Relation(_betas),
    Relation(_float16, read_by=TRAIN),
    Relation(_dispatch, read_by=TRAIN),
    Relation(_data_files, read_by=TRAIN),
    Relation(_eval_files, read_by=TRAIN),
    Relation(_devices, read_by=TRAIN, needs_devices=True),
)


# ----------------------------------------------------------------------------------------------
# The hook of the sampler's own validation.
# ----------------------------------------------------------------------------------------------
def check_sampling_fields(config: ml_collections.ConfigDict) -> None:
    """The sample and eval sections' sampling fields (``SAMPLING_FIELDS``), checked by the
    sampling specification's own validation (``sampler_spec.from_config``): the grids' setting
    and the evaluations' (the eval section over the sample section), as the trainer builds them."""
    try:
        sampler_spec.from_config(config, labels="grid")
    except (ValueError, TypeError) as e:
        raise ValueError(f"config.sample: {e}") from None
    eval_config = config.get("eval")
    if eval_config is None:
        return
    try:
        sampler_spec.from_config(config, eval_config)
    except (ValueError, TypeError) as e:
        raise ValueError(f"config.eval: {e}") from None


# ----------------------------------------------------------------------------------------------
# The start-up check.
# ----------------------------------------------------------------------------------------------
def _unknown_fields(config: ml_collections.ConfigDict) -> Iterator[str]:
    known = {f.path for f in FIELDS} | set(SAMPLING_FIELDS)
    sections = {path.split(".")[0] for path in known if "." in path}

    def walk(node: Any, prefix: str) -> Iterator[str]:
        for key in node.keys():
            path = f"{prefix}{key}"
            if path in known:
                continue
            if path in sections and isinstance(node[key], ml_collections.ConfigDict):
                yield from walk(node[key], f"{path}.")
                continue
            siblings = sorted(sections | {"seed"}) if not prefix else sorted(
                p[len(prefix):] for p in known if p.startswith(prefix))
            yield (f"config.{path} is not a field any program reads (a typo?): "
                   f"{'config.' + prefix[:-1] if prefix else 'the config'} has "
                   f"{', '.join(siblings)}.")

    yield from walk(config, "")


def check_config(
    config: ml_collections.ConfigDict | Mapping[str, Any],
    program: Program,
    *,
    device_count: int | None = None,
    process_count: int = 1,
    fix: str | None = None,
) -> None:
    """Raises ValueError (one line) for the first field of ``config`` that ``program`` reads and
    that takes a value it should not, or the first broken relation between fields. The fields
    the config lacks are skipped (an older checkpoint's config). The device relations ("the batch
    divides over the devices") need ``device_count``; the trainer also refuses fields that no
    program reads, and checks the sampling fields through ``check_sampling_fields``. ``fix``
    replaces the advice of a field's message (default: for the trainer the override setting the
    default value, for the others ``CHECKPOINT_FIX``)."""
    if fix is None and program != "train":
        fix = CHECKPOINT_FIX  # the config of a checkpoint: no --config override changes it
    for field in FIELDS:
        if program not in field.read_by:
            continue
        try:
            value = _get(config, field.path)
        except _Missing:
            continue
        if not field.accepts(value):
            raise ValueError(field_error(field, value, fix))
    if program == "train":
        for message in _unknown_fields(config):
            raise ValueError(message)
    for relation in RELATIONS:
        if program not in relation.read_by or (relation.needs_devices and device_count is None):
            continue
        args = (device_count, process_count) if relation.needs_devices else ()
        try:
            for message in relation.check(config, *args):
                raise ValueError(message)
        except _Missing:
            continue
    if program == "train":
        check_sampling_fields(config)


def check_model_fields(model_config: Mapping[str, Any]) -> None:
    """``check_config`` of a model section alone (``models.unet_from_config``)."""
    check_config({"model": model_config}, "sample", fix="")
