"""One sampling setting, ``SamplerSpec``: the sampler and its options, the steps, classifier-free
guidance, the class labels and the variance, as every program that draws samples takes it.

It is built in one place, ``from_config``: a config's ``sample`` section, overridden by the flags
of ``define_flags`` (``from_flags``: the sample and evaluate programs) or by the config's ``eval``
section (the trainer's evaluations). It is checked once, when it is made (a ValueError naming the
field, the value and what is allowed), and against the model it samples by ``check_against``.
It knows its names: ``name()`` for sample directories (``samples_<name>``), ``tag()`` for results
files and TensorBoard, ``describe()`` for people; its JSON form ``to_json()`` (the sampling part
of ``sampling.json``; ``from_json`` reads the files of earlier versions, a missing field taking
its default) and ``summary()`` (the sampling part of a results record). ``chain_kwargs()`` are
``sampling.sample``'s arguments.

The sampler options (``sampling.OPTIONS``, e.g. DDIM's eta) are spec fields, flags and config
fields by their declaration there: a new sampler and its options need no change here.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Mapping
from typing import Any

import ml_collections
from absl import flags

from ddpm_jax import diffusion, sampling

Labels = str | tuple[int, ...]
LABELS = ("random", "grid", "none")
ALL_STEPS = "all"  # the guidance interval of every step, to override a config's interval


def _text(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
    """How a chain is drawn from a model whose schedule has ``num_timesteps`` T steps.

    ``num_steps``: the respaced chain's length (None, or T: all T steps, no respacing).
    ``options``: the sampler's own options (``sampling.SAMPLERS[sampler].options``), completed
    with their defaults; a mapping is accepted, in which an option the sampler does not take may
    only appear at its default. ``guidance`` w >= 0 at the timesteps (t_min, t_max) of
    ``guidance_interval`` (None: every step; dropped without guidance). ``labels`` of a
    class-conditional model: "random", "grid" (i mod K), "none" (the "no class" label) or a tuple
    of classes (cycled). ``var_type`` and ``clip_denoised`` are the model's (config.diffusion,
    config.sample). ``num_timesteps`` None: not known (a spec read back from a results record).
    """

    num_timesteps: int | None
    sampler: str = "ddpm"
    num_steps: int | None = None
    options: Mapping[str, Any] | tuple[tuple[str, Any], ...] = ()
    guidance: float = 0.0
    guidance_interval: tuple[int, int] | None = None
    labels: Labels = "random"
    var_type: str = "fixedlarge"
    clip_denoised: bool = True

    def __post_init__(self) -> None:
        def set_field(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        own = sampling.check_sampler_args(
            self.num_timesteps, sampler=self.sampler, num_steps=self.num_steps,
            var_type=self.var_type, **dict(self.options),
        )
        set_field("options", tuple(sorted(own.items())))
        if self.num_steps is not None and self.num_steps == self.num_timesteps:
            set_field("num_steps", None)  # all steps: the chain needs no respacing
        if not isinstance(self.guidance, numbers.Real):
            raise ValueError(f"guidance={self.guidance!r}: give a number >= 0 (0: no guidance).")
        sampling.check_guidance(self.guidance, null_class=True)  # w >= 0; the model: check_against
        set_field("guidance", float(self.guidance))
        if not self.guidance:
            set_field("guidance_interval", None)
        sampling.check_guidance_interval(self.guidance_interval, self.num_timesteps)
        if self.guidance_interval is not None:
            set_field("guidance_interval", tuple(self.guidance_interval))
        if isinstance(self.labels, (list, tuple)):
            set_field("labels", tuple(self.labels))
        if not (self.labels in LABELS or (
                isinstance(self.labels, tuple) and self.labels
                and all(isinstance(k, int) and not isinstance(k, bool) for k in self.labels))):
            raise ValueError(f"labels={self.labels!r}: use one of {LABELS} or a tuple of classes.")
        set_field("clip_denoised", bool(self.clip_denoised))

    # ------------------------------------------------------------------------------------------
    # Use.
    # ------------------------------------------------------------------------------------------
    @property
    def steps(self) -> int | None:
        """The chain's number of steps (network calls)."""
        return self.num_steps or self.num_timesteps

    def option(self, name: str) -> Any:
        """An option's value: the sampler's own, else the option's default (no effect)."""
        return dict(self.options).get(name, sampling.OPTIONS[name].default)

    def chain_kwargs(self) -> dict[str, Any]:
        """``sampling.sample``'s keyword arguments for this chain (all but ``mean_type``, the
        model's, and the trajectory)."""
        return dict(sampler=self.sampler, num_steps=self.num_steps, var_type=self.var_type,
                    clip_denoised=self.clip_denoised, **dict(self.options))

    def check_against(self, config: ml_collections.ConfigDict) -> None:
        """Raise ValueError unless this spec can sample the model of ``config``: the schedule
        (its length, and what only its tables reveal, e.g. a log-SNR spacing of DPM-Solver++
        that would repeat timesteps: ``sampling.make_chain``), and the labels and guidance its
        classes take (model.num_classes and the "no class" embedding of label dropout,
        model.p_uncond > 0)."""
        if self.num_timesteps != config.diffusion.num_timesteps:
            raise ValueError(
                f"This sampling setting is for a schedule of num_timesteps={self.num_timesteps}; "
                f"the model's has config.diffusion.num_timesteps={config.diffusion.num_timesteps}."
            )
        sampling.make_chain(diffusion.schedule_from_config(config.diffusion),
                            mean_type=config.diffusion.mean_type, **self.chain_kwargs())
        num_classes, p_uncond = config.model.get("num_classes"), config.model.get("p_uncond", 0.0)
        if isinstance(self.labels, tuple) and any(
                not 0 <= k < (num_classes or 0) for k in self.labels):
            raise ValueError(
                f"labels={self.labels}: a tuple of classes needs a class-conditional model and "
                f"classes in 0..{(num_classes or 0) - 1}, got num_classes={num_classes}."
            )
        if self.labels == "none" and num_classes and not p_uncond:
            raise ValueError(
                "labels='none' (unconditional samples) needs a model trained with label dropout "
                "(config.model.p_uncond > 0); this one has no 'no class' embedding."
            )
        if self.guidance and (self.labels == "none" or not num_classes):
            raise ValueError(
                f"guidance={self.guidance} needs class labels: with labels='none' or an "
                "unconditional model there is nothing to guide towards. Use guidance=0."
            )
        sampling.check_guidance(self.guidance, bool(num_classes) and p_uncond > 0)

    # ------------------------------------------------------------------------------------------
    # Names.
    # ------------------------------------------------------------------------------------------
    def _named_options(self) -> list[tuple[str, Any]]:
        return [(k, v) for k, v in self.options if sampling.OPTIONS[k].in_name]

    def guidance_name(self) -> str:
        """``w<guidance>[_t<t_min>-<t_max>]`` ("" without guidance)."""
        if not self.guidance:
            return ""
        interval = self.guidance_interval
        return f"w{self.guidance:g}" + (f"_t{interval[0]}-{interval[1]}" if interval else "")

    def _labels_name(self) -> str:
        if isinstance(self.labels, str):
            return self.labels
        return "y" + "-".join(map(str, self.labels))

    def name(self) -> str:
        """``<sampler>_<steps>[_<option><value>...][_w<w>[_t<t_min>-<t_max>]][_<labels>]``, e.g.
        ``ddim_100_w2_t500-999_grid``: the sample directory ``samples_<name>`` holds the chunks
        of this setting only (random labels and options that are not ``in_name`` are unnamed)."""
        return self._joined_name([self.sampler, str(self.steps)])

    def tag(self) -> str:
        """``<sampler><steps>[_<option><value>...][_w<w>[_t<t_min>-<t_max>]][_<labels>]``, e.g.
        ``ddpm1000`` or ``ddim100_w0.5``: the sampling part of a result's name."""
        return self._joined_name([f"{self.sampler}{self.steps}"])

    def _joined_name(self, head: list[str]) -> str:
        """``head`` then the named options, the guidance and non-random labels, joined by '_'."""
        parts = head + [f"{k}{_text(v)}" for k, v in self._named_options()]
        if self.guidance:
            parts.append(self.guidance_name())
        if self.labels != "random":
            parts.append(self._labels_name())
        return "_".join(parts)

    def describe(self) -> str:
        """E.g. 'ddpm 50 steps, guidance w=1 at t 400-999' (options that are ``in_name``, and
        labels other than random, are named too)."""
        parts = [f"{self.sampler} {self.steps} steps"]
        parts += [f"{k} {_text(v)}" for k, v in self._named_options()]
        if self.guidance:
            interval = self.guidance_interval
            parts.append(f"guidance w={self.guidance:g}"
                         + (f" at t {interval[0]}-{interval[1]}" if interval else ""))
        if self.labels != "random":
            parts.append(f"labels {self._labels_name()}")
        return ", ".join(parts)

    # ------------------------------------------------------------------------------------------
    # JSON.
    # ------------------------------------------------------------------------------------------
    def _recorded_options(self) -> dict[str, Any]:
        own = dict(self.options)
        return {name: self.option(name) for name, option in sampling.OPTIONS.items()
                if option.recorded or name in own}

    def to_json(self) -> dict[str, Any]:
        """The setting as ``sampling.json`` records it: sampler, num_steps (None: all T), the
        sampler's options and the ``recorded`` ones of ``sampling.OPTIONS`` (at their defaults),
        labels (a name or a list of classes), guidance, guidance_interval (a list or None),
        clip_denoised, var_type."""
        return dict(
            sampler=self.sampler, num_steps=self.num_steps, **self._recorded_options(),
            labels=self.labels if isinstance(self.labels, str) else list(self.labels),
            guidance=self.guidance,
            guidance_interval=list(self.guidance_interval) if self.guidance_interval else None,
            clip_denoised=self.clip_denoised, var_type=self.var_type,
        )

    @classmethod
    def from_json(cls, data: Mapping[str, Any], num_timesteps: int | None) -> SamplerSpec:
        """The spec ``to_json`` wrote (other keys, e.g. a run's seed, are ignored); a field
        missing from the file (written by an earlier version) takes its default."""
        fields = {f.name: data[f.name] for f in dataclasses.fields(cls)
                  if f.name not in ("num_timesteps", "options") and data.get(f.name) is not None}
        options = {name: data.get(name) for name in sampling.OPTIONS}
        return cls(num_timesteps, options=options, **fields)

    def summary(self) -> dict[str, Any]:
        """The sampling part of a results record: sampler, num_steps (the chain's, T for all),
        the options ``to_json`` writes, guidance, guidance_interval."""
        return dict(sampler=self.sampler, num_steps=self.steps, **self._recorded_options(),
                    guidance=self.guidance, guidance_interval=self.guidance_interval)

    @classmethod
    def from_summary(cls, record: Mapping[str, Any]) -> SamplerSpec | None:
        """The spec of a results record's ``summary()`` (None: the figure sampled nothing, e.g.
        bits/dim); the schedule's length and the labels are not recorded there."""
        if record.get("sampler") is None:
            return None
        interval = record.get("guidance_interval")
        return cls(None, sampler=record["sampler"], num_steps=record.get("num_steps"),
                   options={name: record.get(name) for name in sampling.OPTIONS},
                   guidance=record.get("guidance") or 0.0,
                   guidance_interval=None if interval is None else tuple(interval))


def summary_keys() -> tuple[str, ...]:
    """The keys every ``SamplerSpec.summary()`` writes, a sampler's own options aside (None in
    the record of a figure that sampled nothing)."""
    recorded = [name for name, option in sampling.OPTIONS.items() if option.recorded]
    return ("sampler", "num_steps", *recorded, "guidance", "guidance_interval")


# ----------------------------------------------------------------------------------------------
# Building a spec: from a config, flags, or both.
# ----------------------------------------------------------------------------------------------
def from_config(
    config: ml_collections.ConfigDict,
    *overrides: Mapping[str, Any],
    labels: Labels = "random",
) -> SamplerSpec:
    """The spec of ``config.sample``, each field (sampler, num_steps, an option of
    ``sampling.OPTIONS``, guidance, guidance_interval) taken from the first of ``overrides``
    (most specific first: the flags, or ``config.eval``) that sets it (not None), else from
    ``config.sample``; checked against the config's model (``check_against``).

    An option set where the sampler is chosen, or above, belongs to that sampler (an error if it
    takes no such option, unless at its default); one set below, e.g. the sample section's DDIM
    eta when ``--sampler=ddpm`` overrides its sampler, carries over only to a sampler that takes
    it. ``guidance_interval`` may be text as ``--guidance_interval`` takes it: "t_min,t_max", or
    "all" for every step whatever the config says. var_type and clip_denoised are the config's.
    """
    layers = [*overrides, config.sample]

    def first(name: str) -> tuple[int, Any]:
        for level, layer in enumerate(layers):
            if layer.get(name) is not None:
                return level, layer.get(name)
        return len(layers), None

    level, sampler = first("sampler")
    takes = sampling.SAMPLERS[sampler].options if sampler in sampling.SAMPLERS else ()
    options = {}
    for name in sampling.OPTIONS:
        at, value = first(name)
        if at <= level or name in takes:
            options[name] = value
    interval = first("guidance_interval")[1]
    if interval == ALL_STEPS:
        interval = None
    elif isinstance(interval, str):
        try:
            interval = tuple(int(t) for t in interval.split(","))
        except ValueError:
            pass  # the spec's check names the problem
    spec = SamplerSpec(
        config.diffusion.num_timesteps, sampler=sampler, num_steps=first("num_steps")[1],
        options=options, guidance=first("guidance")[1] or 0.0, guidance_interval=interval,
        labels=labels, var_type=config.diffusion.var_type,
        clip_denoised=config.sample.get("clip_denoised", True),
    )
    spec.check_against(config)
    return spec


def add_option_fields(section: ml_collections.ConfigDict, *, inherit: bool) -> None:
    """A config field for each option of ``sampling.OPTIONS``: its default (the sample section),
    or None, which takes the sample section's (``inherit``: the eval section)."""
    for name, option in sampling.OPTIONS.items():
        if inherit or option.default is None:
            section[name] = ml_collections.config_dict.placeholder(option.kind)
        else:
            section[name] = option.default


_DEFINE = {float: flags.DEFINE_float, int: flags.DEFINE_integer, str: flags.DEFINE_string,
           bool: flags.DEFINE_bool}


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """The sampling flags of the sample and evaluate programs (defined once; both may live in one
    process): --sampler, --steps, one per option of ``sampling.OPTIONS`` (--eta, ...),
    --guidance and --guidance_interval, each None by default: the config's."""
    if "sampler" in flag_values:
        return
    samplers = ", ".join(f"{name}: {s.help}" for name, s in sampling.SAMPLERS.items())
    flags.DEFINE_enum("sampler", None, list(sampling.SAMPLERS),
                      f"Sampler ({samplers}); default: the config's sample.sampler.",
                      flag_values=flag_values)
    flags.DEFINE_integer("steps", None, "Sampling steps (respaced); default: the config's "
                         "sample.num_steps, else all T.", flag_values=flag_values)
    for name, option in sampling.OPTIONS.items():
        users = [s for s, sampler in sampling.SAMPLERS.items() if name in sampler.options]
        _DEFINE[option.kind](
            name, None, f"{option.help}, {option.allowed_text} (sampler {', '.join(users)}); "
            f"default: the config's sample.{name}.", flag_values=flag_values)
    flags.DEFINE_float(
        "guidance", None, "Classifier-free guidance scale w: ε̂ = (1+w) ε(x_t, y) - w ε(x_t, ∅) "
        "(default: the config's sample.guidance). Needs a model trained with model.p_uncond > 0.",
        flag_values=flag_values)
    flags.DEFINE_string(
        "guidance_interval", None, "Guide only the steps whose timestep index t (0..T-1) lies in "
        "'t_min,t_max' (Kynkäänniemi et al. 2024), e.g. '400,999'; 'all' guides every step "
        "(default: the config's sample.guidance_interval).", flag_values=flag_values)


def from_flags(
    config: ml_collections.ConfigDict,
    flag_values: flags.FlagValues = flags.FLAGS,
    labels: Labels = "random",
) -> SamplerSpec:
    """The spec of ``define_flags``' flags over the config's sample section (``from_config``)."""
    given = {"sampler": flag_values["sampler"].value, "num_steps": flag_values["steps"].value,
             "guidance": flag_values["guidance"].value,
             "guidance_interval": flag_values["guidance_interval"].value}
    given.update({name: flag_values[name].value for name in sampling.OPTIONS})
    return from_config(config, given, labels=labels)
