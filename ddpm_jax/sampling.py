"""Reverse-process samplers: ancestral DDPM (Ho et al. 2020, Alg. 2), DDIM (Song et al. 2021) and
DPM-Solver++ multistep with its SDE variant (Lu et al. 2022b; the math in ``dpm_solver``).

Each chain is one ``jax.lax.scan`` over its timesteps, so tracing cost does not grow with the
number of steps and a jitted sampler compiles once. The model enters only as
``model_fn(x_t, t) -> model output`` (ε, x_0 or v as ``mean_type`` says), called with the ORIGINAL
timestep indices 0..T-1 of the full schedule, also when the chain is respaced (as
improved-diffusion's ``_WrappedModel`` does), so a network trained on T steps needs no change.
A class-conditional model gets its labels through the closure (``make_model_fn(..., y=labels)``),
and classifier-free guidance too (``make_model_fn(..., guidance=w)``: one batched network call per
step, inside the same scan; ``guidance_interval`` limits it to a range of t): ``sample`` itself
never sees labels.

``sample`` is jittable with everything but ``rng`` static, e.g.::

    @jax.jit
    def generate(params, rng):
        model_fn = make_model_fn(unet, params)
        return sample(model_fn, sched, rng, (64, 32, 32, 3), sampler="ddim", num_steps=50)

Close over ``sched`` as above (a respaced chain builds its tables in float64 NumPy, so the schedule
must be concrete); pass params as an argument so they are not baked into the program as constants.

The samplers and their options are declared in ``SAMPLERS`` and ``OPTIONS``: the sampling settings
(``sampler_spec.SamplerSpec``), the programs' flags and the configs' fields follow from them, so a
new sampler is its step function (a multistep solver: its ``Chain``) and one entry in each table.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import diffusion, dpm_solver

class Trajectory(NamedTuple):
    """Every k-th state of a chain: ``x_t`` [F, *shape] is the input of that step (frame 0 is
    x_T), ``pred_x0`` [F, *shape] the model's x_0 estimate there, ``timesteps`` [F] the step's
    original timestep index."""

    x_t: jax.Array
    pred_x0: jax.Array
    timesteps: jax.Array


# ----------------------------------------------------------------------------------------------
# Respacing (Nichol & Dhariwal 2021, Sec. 4 and App. B).
# ----------------------------------------------------------------------------------------------
def space_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
    """``num_steps`` evenly spaced indices of 0..T-1, ascending, always including 0 and T-1.

    The semantics of improved-diffusion's ``space_timesteps(T, [num_steps])`` (one section):
    index k is round(k (T-1)/(num_steps-1)), Python's round-half-to-even of the accumulated
    stride. One step is the single index T-1 (denoise pure noise in one go).
    """
    if not isinstance(num_steps, (int, np.integer)) or not 1 <= num_steps <= num_timesteps:
        raise ValueError(
            f"num_steps must be an integer in [1, {num_timesteps}] (the schedule's length), "
            f"got {num_steps!r}."
        )
    if num_steps == 1:
        return np.array([num_timesteps - 1], dtype=np.int32)
    stride = (num_timesteps - 1) / (num_steps - 1)
    steps, position = [], 0.0
    for _ in range(num_steps):
        steps.append(round(position))
        position += stride
    return np.array(steps, dtype=np.int32)


def respace(sched: diffusion.Schedule, timesteps: np.ndarray) -> diffusion.Schedule:
    """The schedule of the sub-chain on ``timesteps`` S (ascending): its ᾱ'_i = ᾱ_{S_i}, i.e.
    β'_i = 1 - ᾱ_{S_i} / ᾱ_{S_{i-1}} with ᾱ_{S_{-1}} = 1; every other table follows from β'.

    ᾱ is recomputed in float64 from the stored β, so the new tables lose no precision.
    """
    if isinstance(sched.betas, jax.core.Tracer):
        raise ValueError(
            "Respacing needs a concrete schedule: close over `sched` instead of passing it as an "
            "argument of a jitted function, or sample all steps (num_steps=None)."
        )
    alphas_cumprod = np.cumprod(1.0 - np.asarray(sched.betas, dtype=np.float64))[timesteps]
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    return diffusion.schedule_from_betas(1.0 - alphas_cumprod / alphas_cumprod_prev)


# ----------------------------------------------------------------------------------------------
# One reverse step of each sampler, on the (possibly respaced) schedule at chain index i.
# ----------------------------------------------------------------------------------------------
def _per_example(v: jax.Array, x: jax.Array) -> jax.Array:
    """A [B] array as float32 [B, 1, ..., 1], broadcastable against x."""
    return v.astype(jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1))


def _pred_x0(sched, model_output, x, i, mean_type, clip_denoised):
    pred_x0 = diffusion.predict_x0(sched, model_output, x, i, mean_type)
    return jnp.clip(pred_x0, -1.0, 1.0) if clip_denoised else pred_x0


def _ddpm_step(sched, model_output, x, i, noise, *, mean_type, var_type, clip_denoised):
    """x_{t-1} = μ_θ(x_t, t) + σ_t z (Alg. 2, line 4), z = 0 at the last step."""
    mean, _, log_variance, pred_x0 = diffusion.p_mean_variance(
        sched, model_output, x, i,
        mean_type=mean_type, var_type=var_type, clip_denoised=clip_denoised,
    )
    return mean + _per_example(i > 0, x) * jnp.exp(0.5 * log_variance) * noise, pred_x0


def _ddim_step(sched, model_output, x, i, noise, *, mean_type, var_type, clip_denoised, eta):
    """Song et al. eq. 12: x_{t-1} = sqrt(ᾱ_{t-1}) x̂_0 + sqrt(1 - ᾱ_{t-1} - σ_t²) ε̂ + σ_t z with
    σ_t² = η² (1-ᾱ_{t-1})/(1-ᾱ_t) (1 - ᾱ_t/ᾱ_{t-1}) (eq. 16), which is η² β̃_t of the chain's own
    schedule. ε̂ is recomputed from the (clipped) x̂_0, as improved-diffusion does.
    """
    del var_type
    pred_x0 = _pred_x0(sched, model_output, x, i, mean_type, clip_denoised)
    eps = diffusion.predict_eps_from_x0(sched, x, i, pred_x0)
    alphas_cumprod_prev = diffusion.extract(sched.alphas_cumprod_prev, i, x.shape)
    # 1 - ᾱ_{t-1} from the float64-derived sqrt table (float32 1 - ᾱ loses digits near t = 1).
    sqrt_one_minus_prev = diffusion.extract(
        sched.sqrt_one_minus_alphas_cumprod, jnp.maximum(i - 1, 0), x.shape
    )
    one_minus_prev = jnp.where(_per_example(i > 0, x), sqrt_one_minus_prev**2, 0.0)
    sigma2 = eta**2 * diffusion.extract(sched.posterior_variance, i, x.shape)
    direction = jnp.sqrt(jnp.maximum(one_minus_prev - sigma2, 0.0))
    x_prev = jnp.sqrt(alphas_cumprod_prev) * pred_x0 + direction * eps + jnp.sqrt(sigma2) * noise
    return x_prev, pred_x0


# ----------------------------------------------------------------------------------------------
# The samplers and their options.
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Option:
    """A sampler option (a keyword of ``sample``, a field of ``SamplerSpec``, a flag of the sample
    and evaluate programs, a config field). ``default`` is the value a sampler that does not take
    the option holds it at (where it has no effect): only that value may be given to such a
    sampler. ``in_name``: the value is part of the setting's directory name and description.
    ``recorded``: every ``sampling.json`` and results record holds it, at its default where the
    sampler does not take it; other options are recorded by the samplers that take them only."""

    kind: type  # float, int, str or bool
    default: Any
    allowed: Callable[[Any], bool]
    allowed_text: str  # what ``allowed`` accepts, for the error message
    help: str
    in_name: bool = True
    recorded: bool = False


class Chain(NamedTuple):
    """A sampler's chain on one concrete schedule, built before anything is traced
    (``make_chain``). Chain index i (``n - 1`` down to 0, step j = n - 1 - i) calls the model at
    the original timestep ``timesteps[i]`` (ascending);
    ``step(model_output, x, i, j, noise, state) -> (x_{i-1}, pred_x0, state)`` (i int32 [B], the
    index into the schedule respaced to ``timesteps``; j a scalar); ``init(x_T)`` is the first
    ``state`` (the carry a multistep sampler keeps: () for a one-step sampler); ``noisy``:
    whether the step takes noise (else it gets None and none is drawn)."""

    timesteps: np.ndarray
    step: Callable[..., tuple[jax.Array, jax.Array, Any]]
    init: Callable[[jax.Array], Any]
    noisy: bool


class Sampler(NamedTuple):
    """A sampler: its step ``step(sched, model_output, x, i, noise, *, mean_type, var_type,
    clip_denoised, **options)`` -> (x_{i-1}, pred_x0), run on ``space_timesteps``' respaced
    schedule, the ``OPTIONS`` it takes, and a check of its options against the schedule's length
    and the number of steps (raising ValueError; either may be None: not known), if it has one.
    A sampler that picks its own timesteps or keeps a state between steps (a multistep solver)
    has ``chain(sched, num_steps, *, mean_type, var_type, clip_denoised, **options) -> Chain``
    instead of ``step`` (None)."""

    step: Callable[..., tuple[jax.Array, jax.Array]] | None
    options: tuple[str, ...]
    help: str
    check: Callable[..., None] | None = None  # check(num_timesteps, num_steps, **options)
    chain: Callable[..., Chain] | None = None


def _solver_chain(
    sched: diffusion.Schedule, num_steps: int, *, mean_type: str, var_type: str,
    clip_denoised: bool, order: int, spacing: str, sde: bool = False,
) -> Chain:
    """DPM-Solver++ (``sde``: DPM-Solver++ SDE) of ``order`` on ``dpm_solver.make_tables``'
    timesteps: each step turns the model output into x̂_0 as the other samplers do (on the
    schedule respaced to the solver's timesteps, clipped with ``clip_denoised``) and applies the
    solver's affine update to x and the history of x̂_0 it carries. ``var_type`` has no meaning
    here (the ODE adds no noise; the SDE's noise scale follows from λ) and is ignored."""
    del var_type
    tables = dpm_solver.make_tables(sched, num_steps, order=order, spacing=spacing, sde=sde)
    timesteps = tables.timesteps[::-1]
    chain_sched = respace(sched, timesteps)

    def step(model_output, x, i, j, noise, history):
        pred_x0 = _pred_x0(chain_sched, model_output, x, i, mean_type, clip_denoised)
        x_next, history = dpm_solver.step(tables, j, x, pred_x0, history, noise)
        return x_next, pred_x0, history

    return Chain(timesteps, step, lambda x: dpm_solver.init_history(tables, x), sde)


def _check_solver(num_timesteps: int | None, num_steps: int | None, *, sde: bool = False,
                  **options: Any) -> None:
    """``dpm_solver.check_solver_args`` (orders, the fewest and most steps) when the schedule's
    length is known; a log-SNR spacing that repeats timesteps on the schedule is ``make_chain``'s
    error (it needs the schedule itself)."""
    if num_timesteps is not None:
        dpm_solver.check_solver_args(num_timesteps, num_steps=num_steps, sde=sde, **options)


OPTIONS = {
    "eta": Option(
        float, 0.0, lambda eta: 0 <= eta < math.inf, ">= 0 (finite)",
        "DDIM eta: 0 deterministic, 1 ancestral sampling with fixedsmall variance",
        in_name=False, recorded=True,  # as directories, files and records always had it
    ),
    "order": Option(
        int, 2, lambda k: k in dpm_solver.ORDERS, "1, 2 or 3 (the SDE: 1 or 2)",
        "DPM-Solver++ order: the number of past x_0 estimates a step uses; order k needs at "
        "least 2k-1 steps",
    ),
    "spacing": Option(
        str, "time", lambda s: s in dpm_solver.SPACINGS, " or ".join(dpm_solver.SPACINGS),
        "DPM-Solver++ timesteps: evenly spaced in time, or in log-SNR, which allows fewer steps "
        "(at most 38 on the linear 1000-step schedule)",
    ),
}
_SOLVER_OPTIONS = ("order", "spacing")
SAMPLERS = {
    "ddpm": Sampler(_ddpm_step, (), "ancestral sampling (Ho et al. 2020, Alg. 2)"),
    "ddim": Sampler(_ddim_step, ("eta",), "DDIM (Song et al. 2021, eq. 12)"),
    "dpm++": Sampler(
        None, _SOLVER_OPTIONS, "DPM-Solver++ multistep (Lu et al. 2022b, Alg. 2)",
        _check_solver, _solver_chain,
    ),
    "dpm++sde": Sampler(
        None, _SOLVER_OPTIONS, "DPM-Solver++(2M) SDE (Lu et al. 2022b)",
        functools.partial(_check_solver, sde=True), functools.partial(_solver_chain, sde=True),
    ),
}


def _users(option: str) -> str:
    names = [repr(name) for name, s in SAMPLERS.items() if option in s.options]
    return f"the {' and '.join(names)} sampler{'s' if len(names) > 1 else ''}"


def check_sampler_args(
    num_timesteps: int | None,
    *,
    sampler: str,
    num_steps: int | None,
    var_type: str = "fixedlarge",
    **options: Any,
) -> dict[str, Any]:
    """Raise ValueError for arguments ``sample`` would reject (before anything is traced); return
    the sampler's own options, each the given value (as its kind) or its default.

    An option of ``OPTIONS`` the sampler does not take may only be given at its default (None
    counts as not given); a traced value goes unchecked. ``num_timesteps`` None: the schedule's
    length is not known here (a spec read back from a results file), and ``num_steps`` is not
    checked against it."""
    if sampler not in SAMPLERS:
        raise ValueError(f"Unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}.")
    if var_type not in diffusion.VAR_TYPES:
        raise ValueError(
            f"Unknown var_type {var_type!r}; choose one of {', '.join(diffusion.VAR_TYPES)}."
        )
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"Unknown sampler option {unknown[0]}; the options are "
                         f"{', '.join(OPTIONS)} (each for the samplers that take it).")
    own = SAMPLERS[sampler].options
    resolved = {name: OPTIONS[name].default for name in own}
    for name, value in options.items():
        if value is None:
            continue  # not given
        option = OPTIONS[name]
        if not isinstance(value, jax.core.Tracer):  # a traced value goes unchecked
            kind = {float: numbers.Real, int: numbers.Integral}.get(option.kind, option.kind)
            if not isinstance(value, kind) or (isinstance(value, bool) and option.kind is not bool):
                raise ValueError(f"{name}={value!r} is invalid: {name} is a {option.kind.__name__}"
                                 f", {option.allowed_text} ({option.help}).")
            value = option.kind(value)
            if name not in own and value != option.default:
                takes = f"the options {', '.join(own)}" if own else "no options"
                raise ValueError(
                    f"{name}={value!r} is invalid for sampler {sampler!r}, which takes {takes}: "
                    f"{name} is only used by {_users(name)} ({option.help})."
                )
            if not option.allowed(value):
                raise ValueError(f"{name}={value!r} is invalid for sampler {sampler!r}: {name} "
                                 f"must be {option.allowed_text} ({option.help}).")
        if name in own:
            resolved[name] = value
    if num_steps is not None and num_timesteps is not None:
        space_timesteps(num_timesteps, num_steps)  # an integer in [1, T]
    if SAMPLERS[sampler].check is not None:
        SAMPLERS[sampler].check(num_timesteps, num_steps or num_timesteps, **resolved)
    return resolved


# ----------------------------------------------------------------------------------------------
# The chain.
# ----------------------------------------------------------------------------------------------
def make_chain(
    sched: diffusion.Schedule,
    *,
    sampler: str = "ddpm",
    num_steps: int | None = None,
    var_type: str = "fixedlarge",
    clip_denoised: bool = True,
    mean_type: str = "eps",
    **options: Any,
) -> Chain:
    """The ``Chain`` of ``sample``'s arguments on the concrete schedule ``sched`` (float64 NumPy,
    nothing traced); raises ValueError for settings ``sample`` would reject, including those only
    the schedule reveals (a log-SNR spacing that repeats timesteps)."""
    options = check_sampler_args(
        sched.num_timesteps, sampler=sampler, num_steps=num_steps, var_type=var_type, **options
    )
    settings = dict(mean_type=mean_type, var_type=var_type, clip_denoised=clip_denoised)
    build = SAMPLERS[sampler].chain
    if build is not None:
        return build(sched, num_steps or sched.num_timesteps, **settings, **options)
    if num_steps is None:
        timesteps = np.arange(sched.num_timesteps, dtype=np.int32)
    else:
        timesteps = space_timesteps(sched.num_timesteps, num_steps)
        sched = respace(sched, timesteps)
    one_step = functools.partial(SAMPLERS[sampler].step, sched, **settings, **options)

    def step(model_output, x, i, j, noise, state):
        del j
        return (*one_step(model_output, x, i, noise), state)

    return Chain(timesteps, step, lambda x: (), noisy=True)


def sample(
    model_fn: diffusion.ModelFn,
    sched: diffusion.Schedule,
    rng: jax.Array,
    shape: tuple[int, ...],
    *,
    sampler: str = "ddpm",
    num_steps: int | None = None,
    var_type: str = "fixedlarge",
    clip_denoised: bool = True,
    mean_type: str = "eps",
    return_trajectory: bool = False,
    trajectory_every: int | None = None,
    **options: Any,
) -> jax.Array | tuple[jax.Array, Trajectory]:
    """Draw float32 samples of ``shape`` [B, ...] from x_T ~ N(0, I) down to x_0.

    ``sampler="ddpm"``: ancestral sampling (Alg. 2) with σ_t² = β_t ("fixedlarge") or β̃_t
    ("fixedsmall"). ``sampler="ddim"``: DDIM with ``eta`` (0: deterministic; 1: the ancestral
    sampler with fixedsmall variance; it may be traced). ``sampler="dpm++"``: DPM-Solver++ of
    ``order`` 1-3 with ``spacing`` "time" or "logsnr" (``dpm_solver``; its last step returns
    x̂_0), ``"dpm++sde"`` its SDE variant (order 1-2); both ignore ``var_type``. ``options`` are
    the sampler's own (``SAMPLERS``, ``OPTIONS``). ``num_steps=None`` runs all T steps;
    otherwise ddpm and ddim run on ``space_timesteps(T, num_steps)`` with the respaced schedule.

    x_T comes from ``split(rng)[0]``, the noise of chain index i (``num_steps - 1`` down to 0)
    from ``fold_in(split(rng)[1], i)`` (drawn only by samplers that use noise); the last step
    adds none. With ``return_trajectory`` also returns a ``Trajectory`` of every
    ``trajectory_every``-th step (default: about 10 frames).
    """
    chain = make_chain(sched, sampler=sampler, num_steps=num_steps, var_type=var_type,
                       clip_denoised=clip_denoised, mean_type=mean_type, **options)
    if len(shape) < 2:
        raise ValueError(f"shape must be [batch, ...] with at least 2 axes, got {shape}.")
    timesteps = chain.timesteps
    n = len(timesteps)
    every = max(1, n // 10) if trajectory_every is None else trajectory_every
    if every < 1:
        raise ValueError(f"trajectory_every must be a positive integer, got {trajectory_every}.")
    num_frames = math.ceil(n / every)
    rng_init, rng_steps = jax.random.split(rng)
    batch = shape[0]

    def body(carry: tuple[Any, ...], j: jax.Array) -> tuple[tuple[Any, ...], None]:
        x, state = carry[:2]
        i = n - 1 - j  # chain index, from the noisiest step down to 0
        i_batch = jnp.full((batch,), i, dtype=jnp.int32)
        t_model = jnp.full((batch,), jnp.asarray(timesteps)[i], dtype=jnp.int32)
        noise = None
        if chain.noisy:
            noise = jax.random.normal(jax.random.fold_in(rng_steps, i), shape, jnp.float32)
        x_prev, pred_x0, state = chain.step(model_fn(x, t_model), x, i_batch, j, noise, state)
        if not return_trajectory:
            return (x_prev, state), None
        frame, keep = j // every, j % every == 0
        frames = tuple(
            jax.lax.dynamic_update_index_in_dim(buf, jnp.where(keep, new, buf[frame]), frame, 0)
            for buf, new in zip(carry[2:], (x, pred_x0), strict=True)
        )
        return (x_prev, state, *frames), None

    x_init = jax.random.normal(rng_init, shape, jnp.float32)
    carry = (x_init, chain.init(x_init))
    if return_trajectory:
        carry += (jnp.zeros((num_frames, *shape), jnp.float32),) * 2
    carry, _ = jax.lax.scan(body, carry, jnp.arange(n, dtype=jnp.int32))
    if not return_trajectory:
        return carry[0]
    frame_timesteps = jnp.asarray(timesteps[::-1][::every])
    return carry[0], Trajectory(x_t=carry[2], pred_x0=carry[3], timesteps=frame_timesteps)


def check_guidance(guidance: float, null_class: bool) -> None:
    """Raise ValueError unless ``guidance`` w >= 0 and, for w > 0, the model has the "no class"
    embedding (``null_class``: trained with label dropout, config.model.p_uncond > 0)."""
    if not guidance >= 0:
        raise ValueError(f"guidance must be a number >= 0 (w = 0: no guidance), got {guidance}.")
    if guidance and not null_class:
        raise ValueError(
            f"guidance={guidance} needs a class-conditional model trained with label dropout "
            "(config.model.p_uncond > 0), which learns the 'no class' prediction f(x_t, ∅); this "
            "model has none. Sample it with guidance=0, or retrain with model.p_uncond=0.1."
        )


def check_guidance_interval(interval: Any, num_timesteps: int | None = None) -> None:
    """Raise ValueError unless ``interval`` is None or two timestep indices (t_min, t_max) with
    0 <= t_min <= t_max (< ``num_timesteps`` if given)."""
    if interval is None:
        return
    ok = (
        isinstance(interval, (tuple, list))
        and len(interval) == 2
        and all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in interval)
        and 0 <= interval[0] <= interval[1]
        and (num_timesteps is None or interval[1] < num_timesteps)
    )
    if not ok:
        last = "T-1" if num_timesteps is None else str(num_timesteps - 1)
        raise ValueError(
            f"guidance_interval={interval!r}: give two timestep indices (t_min, t_max) with "
            f"0 <= t_min <= t_max <= {last}, e.g. (400, {last}), or none to guide every step."
        )


def make_model_fn(
    model: Any,
    params: Any,
    y: jax.Array | None = None,
    guidance: float = 0.0,
    guidance_interval: tuple[int, int] | None = None,
) -> diffusion.ModelFn:
    """``model_fn(x_t, t) = model.apply({'params': params}, x_t, t, y=y, train=False)``, or with
    ``guidance`` w > 0 its classifier-free-guided version (Ho & Salimans 2022, eq. 6):

        f̃(x_t, y) = (1 + w) f(x_t, y) - w f(x_t, ∅)

    from ONE network call on the batch of 2B rows x_t[0], x_t[0], x_t[1], x_t[1], ... with labels
    y[0], ∅, y[1], ∅, ... (∅ = label ``model.num_classes``, the "no class" embedding of a model
    trained with label dropout). Interleaved, not [x_t; x_t]: when the batch is split over
    devices, each device's rows and their twins stay on it, so a step moves no data between
    devices (concatenating would reshuffle rows across devices at every step).
    f is the network's output, ε, x_0 or v: each of them is affine in ε at fixed (x_t, t)
    (x_0 = (x_t - sqrt(1-ᾱ_t) ε)/sqrt(ᾱ_t), v = (ε - sqrt(1-ᾱ_t) x_t)/sqrt(ᾱ_t)) and the weights
    (1 + w, -w) sum to 1, so combining outputs is the paper's ε̃ in every parameterisation.
    w = 0 is the plain conditional call (no unconditional half).

    ``guidance_interval`` (t_min, t_max), original timestep indices, guides only the examples
    with t_min <= t <= t_max and leaves the others conditional (w = 0), as Kynkäänniemi et al.
    2024 ("Applying guidance in a limited interval") do; a call with no example inside skips the
    unconditional half (``lax.cond``), so steps outside cost one network pass. None: every t.

    ``y`` (int32 [B]) are the class labels of a class-conditional model (``model.num_classes``
    set; label ``num_classes`` samples unconditionally from a model with a "no class" row); an
    unconditional model takes none. ``guidance`` is a Python float.
    """
    num_classes = getattr(model, "num_classes", None)
    if (num_classes is None) != (y is None):
        raise ValueError(
            f"The model has num_classes={num_classes} but y is "
            f"{'None' if y is None else 'given'}: pass labels y (int32 [batch]) exactly when the "
            "model is class-conditional."
        )
    check_guidance(guidance, getattr(model, "null_class", False))
    check_guidance_interval(guidance_interval)

    def model_fn(x_t: jax.Array, t: jax.Array) -> jax.Array:
        return model.apply({"params": params}, x_t, t, y=y, train=False)

    if not guidance:
        return model_fn

    def inside(t: jax.Array) -> jax.Array:  # with a guidance_interval
        return (t >= guidance_interval[0]) & (t <= guidance_interval[1])

    def pairs(a: jax.Array, b: jax.Array) -> jax.Array:
        """[B, ...] twice -> [2B, ...] as rows a_0, b_0, a_1, b_1, ...: each example next to its
        twin, so a batch split over devices stays split the same way (no data moves)."""
        return jnp.stack([a, b], axis=1).reshape((2 * a.shape[0], *a.shape[1:]))

    def guided_model_fn(x_t: jax.Array, t: jax.Array) -> jax.Array:
        out = model.apply(
            {"params": params}, pairs(x_t, x_t), pairs(t, t),
            y=pairs(y, jnp.full_like(y, num_classes)), train=False,
        ).reshape((x_t.shape[0], 2, *x_t.shape[1:]))
        cond, uncond = out[:, 0], out[:, 1]
        w = guidance if guidance_interval is None else _per_example(
            jnp.where(inside(t), guidance, 0.0), x_t)
        return (1.0 + w) * cond - w * uncond

    if guidance_interval is None:
        return guided_model_fn

    def interval_model_fn(x_t: jax.Array, t: jax.Array) -> jax.Array:
        return jax.lax.cond(jnp.any(inside(t)), guided_model_fn, model_fn, x_t, t)

    return interval_model_fn
