"""The Gaussian diffusion of Ho et al. 2020 (DDPM): everything about q and p that needs no network.

Notation follows the paper: β_t the noise schedule, α_t = 1 - β_t, ᾱ_t = Π_{s<=t} α_s. Timesteps
are int32 arrays ``t`` of shape [B] holding indices 0..T-1 (index 0 is the paper's t = 1, the
first noising step). Every function is pure and jit/vmap-able, works for any array shape whose
leading axis is the batch (NHWC images in practice), and accepts any float input dtype: the
tables and all loss/likelihood arithmetic are float32, sampled arrays keep the input dtype.

Tables are computed in float64 NumPy and stored as float32, as the original TF code does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import chex
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]

SCHEDULES = ("linear", "quad", "const", "jsd", "warmup10", "warmup50", "cosine", "sigmoid")
MEAN_TYPES = ("eps", "x0", "v")
VAR_TYPES = ("fixedlarge", "fixedsmall")


# ----------------------------------------------------------------------------------------------
# Schedules.
# ----------------------------------------------------------------------------------------------
@flax.struct.dataclass
class Schedule:
    """Per-timestep float32 tables of the forward process and its posterior (all shape [T])."""

    betas: jax.Array
    alphas: jax.Array
    alphas_cumprod: jax.Array
    alphas_cumprod_prev: jax.Array
    sqrt_alphas_cumprod: jax.Array
    sqrt_one_minus_alphas_cumprod: jax.Array
    log_one_minus_alphas_cumprod: jax.Array
    sqrt_recip_alphas_cumprod: jax.Array
    sqrt_recipm1_alphas_cumprod: jax.Array
    posterior_variance: jax.Array
    posterior_log_variance_clipped: jax.Array
    posterior_mean_coef1: jax.Array
    posterior_mean_coef2: jax.Array

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]


def _warmup_betas(
    beta_start: float, beta_end: float, num_timesteps: int, frac: float
) -> np.ndarray:
    betas = np.full(num_timesteps, beta_end, dtype=np.float64)
    warmup = int(num_timesteps * frac)
    betas[:warmup] = np.linspace(beta_start, beta_end, warmup, dtype=np.float64)
    return betas


def _cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Nichol & Dhariwal 2021, eq. 17: ᾱ(t) = cos²((t/T + s)/(1 + s) · π/2), β clipped at 0.999."""
    steps = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
    alpha_bar = np.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    return np.minimum(1.0 - alpha_bar[1:] / alpha_bar[:-1], max_beta)


def _sigmoid_betas(
    beta_start: float, beta_end: float, num_timesteps: int, start: float = -6.0, end: float = 6.0
) -> np.ndarray:
    """β rising as a logistic curve from beta_start to beta_end (as in GeoDiff)."""
    x = np.linspace(start, end, num_timesteps, dtype=np.float64)
    return 1.0 / (1.0 + np.exp(-x)) * (beta_end - beta_start) + beta_start


def get_beta_schedule(
    name: str,
    num_timesteps: int = 1000,
    *,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    **kwargs: float,
) -> np.ndarray:
    """The float64 β_1..β_T of a named schedule (the original code's names, plus cosine, sigmoid).

    ``kwargs`` go to the cosine (``s``, ``max_beta``) and sigmoid (``start``, ``end``) schedules.
    """
    if not isinstance(num_timesteps, (int, np.integer)) or num_timesteps <= 0:
        raise ValueError(f"num_timesteps must be a positive integer, got {num_timesteps!r}.")
    if name == "linear":
        betas = np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)
    elif name == "quad":
        betas = np.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=np.float64) ** 2
    elif name == "const":
        betas = np.full(num_timesteps, beta_end, dtype=np.float64)
    elif name == "jsd":  # 1/T, 1/(T-1), ..., 1
        betas = 1.0 / np.linspace(num_timesteps, 1, num_timesteps, dtype=np.float64)
    elif name == "warmup10":
        betas = _warmup_betas(beta_start, beta_end, num_timesteps, 0.1)
    elif name == "warmup50":
        betas = _warmup_betas(beta_start, beta_end, num_timesteps, 0.5)
    elif name == "cosine":
        betas = _cosine_betas(num_timesteps, **kwargs)
    elif name == "sigmoid":
        betas = _sigmoid_betas(beta_start, beta_end, num_timesteps, **kwargs)
    else:
        raise ValueError(f"Unknown beta schedule {name!r}; choose one of {', '.join(SCHEDULES)}.")
    if name not in ("cosine", "sigmoid") and kwargs:
        raise ValueError(f"Schedule {name!r} takes no options {sorted(kwargs)}.")
    return betas


def schedule_from_betas(betas: np.ndarray) -> Schedule:
    """All tables of the forward process and posterior (eqs. 4, 6, 7) for the given β_1..β_T.

    β must lie in (0, 1]. β_T = 1 (the "jsd" schedule) is allowed as in the original code: then
    ᾱ_T = 0 and x_T is pure noise.
    """
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or betas.size == 0:
        raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}.")
    if not np.all(np.isfinite(betas)) or np.any(betas <= 0) or np.any(betas > 1):
        bad = betas[~((betas > 0) & (betas <= 1))]
        raise ValueError(
            f"Every beta must lie in (0, 1]; got {bad[:5]} (min {betas.min()}, max {betas.max()})."
        )
    alphas = 1.0 - betas
    alphas_cumprod = np.cumprod(alphas)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    with np.errstate(divide="ignore"):
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        tables = dict(
            betas=betas,
            alphas=alphas,
            alphas_cumprod=alphas_cumprod,
            alphas_cumprod_prev=alphas_cumprod_prev,
            sqrt_alphas_cumprod=np.sqrt(alphas_cumprod),
            sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - alphas_cumprod),
            log_one_minus_alphas_cumprod=np.log(1.0 - alphas_cumprod),
            sqrt_recip_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod),
            sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod - 1.0),
            posterior_variance=posterior_variance,
            # β̃_1 = 0, so the log is clipped by repeating β̃_2 at t = 1, as the original does.
            posterior_log_variance_clipped=np.log(
                np.append(posterior_variance[min(1, betas.size - 1)], posterior_variance[1:])
            ),
            posterior_mean_coef1=betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
            posterior_mean_coef2=(
                (1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod)
            ),
        )
    return Schedule(**{k: jnp.asarray(v, dtype=jnp.float32) for k, v in tables.items()})


def make_schedule(name: str = "linear", num_timesteps: int = 1000, **kwargs: float) -> Schedule:
    """A named schedule's tables, e.g. ``make_schedule("linear", 1000)`` (β from 1e-4 to 0.02)."""
    return schedule_from_betas(get_beta_schedule(name, num_timesteps, **kwargs))


def schedule_from_config(diffusion_config: Any) -> Schedule:
    """The schedule a config's ``diffusion`` section names (schedule, num_timesteps, beta_start,
    beta_end)."""
    return make_schedule(
        diffusion_config.schedule,
        diffusion_config.num_timesteps,
        beta_start=diffusion_config.beta_start,
        beta_end=diffusion_config.beta_end,
    )


# ----------------------------------------------------------------------------------------------
# Helpers.
# ----------------------------------------------------------------------------------------------
def _check_batch(x: jax.Array, t: jax.Array) -> None:
    if t.ndim != 1 or not jnp.issubdtype(t.dtype, jnp.integer):
        raise ValueError(f"t must be an integer array of shape [batch], got {t.dtype}{t.shape}.")
    if x.ndim < 1 or x.shape[0] != t.shape[0]:
        raise ValueError(f"x has shape {x.shape} but t has shape {t.shape}: batch sizes differ.")


def extract(table: jax.Array, t: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """table[t] as float32 of shape [B, 1, ..., 1], broadcastable against an array of ``shape``."""
    return jnp.asarray(table, jnp.float32)[t].reshape((t.shape[0],) + (1,) * (len(shape) - 1))


def _mean_flat(x: jax.Array) -> jax.Array:
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def _f32(x: jax.Array) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


# ----------------------------------------------------------------------------------------------
# The forward process q.
# ----------------------------------------------------------------------------------------------
def q_mean_variance(
    sched: Schedule, x0: jax.Array, t: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q(x_t | x_0) = N(sqrt(ᾱ_t) x_0, (1 - ᾱ_t) I) (eq. 4): mean, variance, log-variance."""
    _check_batch(x0, t)
    mean = extract(sched.sqrt_alphas_cumprod, t, x0.shape) * _f32(x0)
    # Squared from the float32 sqrt table: 1 - ᾱ_t computed in float32 would lose digits near t = 1.
    variance = extract(sched.sqrt_one_minus_alphas_cumprod, t, x0.shape) ** 2
    log_variance = extract(sched.log_one_minus_alphas_cumprod, t, x0.shape)
    return mean, variance, log_variance


def q_sample(sched: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε, a draw of q(x_t | x_0) (eq. 4)."""
    _check_batch(x0, t)
    chex.assert_equal_shape([x0, noise])
    x_t = (
        extract(sched.sqrt_alphas_cumprod, t, x0.shape) * _f32(x0)
        + extract(sched.sqrt_one_minus_alphas_cumprod, t, x0.shape) * _f32(noise)
    )
    return x_t.astype(x0.dtype)


def q_posterior(
    sched: Schedule, x0: jax.Array, x_t: jax.Array, t: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q(x_{t-1} | x_t, x_0) = N(μ̃_t, β̃_t I) (eqs. 6, 7): mean, variance, clipped log-variance."""
    _check_batch(x_t, t)
    chex.assert_equal_shape([x0, x_t])
    mean = (
        extract(sched.posterior_mean_coef1, t, x_t.shape) * _f32(x0)
        + extract(sched.posterior_mean_coef2, t, x_t.shape) * _f32(x_t)
    )
    variance = extract(sched.posterior_variance, t, x_t.shape)
    log_variance = extract(sched.posterior_log_variance_clipped, t, x_t.shape)
    return mean, variance, log_variance


# ----------------------------------------------------------------------------------------------
# Conversions between the parameterisations ε, x_0 and v.
# ----------------------------------------------------------------------------------------------
def predict_x0_from_eps(sched: Schedule, x_t: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
    """x_0 = (x_t - sqrt(1 - ᾱ_t) ε) / sqrt(ᾱ_t), the inverse of eq. 4 (as in eq. 15)."""
    return (
        extract(sched.sqrt_recip_alphas_cumprod, t, x_t.shape) * _f32(x_t)
        - extract(sched.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * _f32(eps)
    )


def predict_eps_from_x0(sched: Schedule, x_t: jax.Array, t: jax.Array, x0: jax.Array) -> jax.Array:
    """ε = (x_t / sqrt(ᾱ_t) - x_0) / sqrt(1/ᾱ_t - 1), the inverse of ``predict_x0_from_eps``."""
    return (
        extract(sched.sqrt_recip_alphas_cumprod, t, x_t.shape) * _f32(x_t) - _f32(x0)
    ) / extract(sched.sqrt_recipm1_alphas_cumprod, t, x_t.shape)


def predict_v(sched: Schedule, x0: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
    """v = sqrt(ᾱ_t) ε - sqrt(1 - ᾱ_t) x_0 (Salimans & Ho 2022)."""
    return (
        extract(sched.sqrt_alphas_cumprod, t, x0.shape) * _f32(eps)
        - extract(sched.sqrt_one_minus_alphas_cumprod, t, x0.shape) * _f32(x0)
    )


def predict_x0_from_v(sched: Schedule, x_t: jax.Array, t: jax.Array, v: jax.Array) -> jax.Array:
    """x_0 = sqrt(ᾱ_t) x_t - sqrt(1 - ᾱ_t) v."""
    return (
        extract(sched.sqrt_alphas_cumprod, t, x_t.shape) * _f32(x_t)
        - extract(sched.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * _f32(v)
    )


def predict_eps_from_v(sched: Schedule, x_t: jax.Array, t: jax.Array, v: jax.Array) -> jax.Array:
    """ε = sqrt(1 - ᾱ_t) x_t + sqrt(ᾱ_t) v."""
    return (
        extract(sched.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * _f32(x_t)
        + extract(sched.sqrt_alphas_cumprod, t, x_t.shape) * _f32(v)
    )


def predict_x0(
    sched: Schedule, model_output: jax.Array, x_t: jax.Array, t: jax.Array, mean_type: str = "eps"
) -> jax.Array:
    """The network's estimate of x_0 under any parameterisation (``mean_type``: eps, x0 or v)."""
    if mean_type == "eps":
        return predict_x0_from_eps(sched, x_t, t, model_output)
    if mean_type == "x0":
        return _f32(model_output)
    if mean_type == "v":
        return predict_x0_from_v(sched, x_t, t, model_output)
    raise ValueError(f"Unknown mean_type {mean_type!r}; choose one of {', '.join(MEAN_TYPES)}.")


# ----------------------------------------------------------------------------------------------
# The reverse process p.
# ----------------------------------------------------------------------------------------------
def model_variance(
    sched: Schedule, t: jax.Array, shape: tuple[int, ...], var_type: str = "fixedlarge"
) -> tuple[jax.Array, jax.Array]:
    """σ_t² of p(x_{t-1} | x_t) and its log (Sec. 3.2).

    "fixedlarge" is σ_t² = β_t, except at t = 1 where the original uses β̃_2 so that the
    decoder's log-variance is finite (a one-step schedule, e.g. a chain respaced to one step, has
    no β̃_2 and keeps β_1); "fixedsmall" is σ_t² = β̃_t with the clipped log.
    """
    if var_type == "fixedlarge":
        first = sched.posterior_variance[1:2] if sched.betas.shape[0] > 1 else sched.betas[:1]
        variance_table = jnp.concatenate([first, sched.betas[1:]])
        variance = extract(variance_table, t, shape)
        return variance, jnp.log(variance)
    if var_type == "fixedsmall":
        return (
            extract(sched.posterior_variance, t, shape),
            extract(sched.posterior_log_variance_clipped, t, shape),
        )
    raise ValueError(f"Unknown var_type {var_type!r}; choose one of {', '.join(VAR_TYPES)}.")


def p_mean_variance(
    sched: Schedule,
    model_output: jax.Array,
    x_t: jax.Array,
    t: jax.Array,
    *,
    mean_type: str = "eps",
    var_type: str = "fixedlarge",
    clip_denoised: bool = True,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """p_θ(x_{t-1} | x_t) = N(μ_θ, σ_t² I): mean, variance, log-variance and the predicted x_0.

    μ_θ is the posterior mean (eq. 7) at the predicted x_0, clipped to [-1, 1] when
    ``clip_denoised``; for ε-prediction without clipping this equals eq. 11.
    """
    _check_batch(x_t, t)
    chex.assert_equal_shape([model_output, x_t])
    pred_x0 = predict_x0(sched, model_output, x_t, t, mean_type)
    if clip_denoised:
        pred_x0 = jnp.clip(pred_x0, -1.0, 1.0)
    mean, _, _ = q_posterior(sched, pred_x0, x_t, t)
    variance, log_variance = model_variance(sched, t, x_t.shape, var_type)
    return mean, variance, log_variance, pred_x0


# ----------------------------------------------------------------------------------------------
# Losses and the variational bound.
# ----------------------------------------------------------------------------------------------
def training_target(
    sched: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array, mean_type: str = "eps"
) -> jax.Array:
    """What the network regresses onto: ε, x_0 or v."""
    if mean_type == "eps":
        return _f32(noise)
    if mean_type == "x0":
        return _f32(x0)
    if mean_type == "v":
        return predict_v(sched, x0, t, noise)
    raise ValueError(f"Unknown mean_type {mean_type!r}; choose one of {', '.join(MEAN_TYPES)}.")


def training_losses(
    sched: Schedule,
    model_fn: ModelFn,
    x0: jax.Array,
    t: jax.Array,
    noise: jax.Array,
    *,
    mean_type: str = "eps",
) -> jax.Array:
    """L_simple (eq. 14) per example, shape [B] float32: the mean squared error between the target
    (ε for ``mean_type="eps"``, else x_0 or v) and ``model_fn(x_t, t)`` at x_t = q_sample(x0, t, ε).
    """
    target = training_target(sched, x0, t, noise, mean_type)
    model_output = model_fn(q_sample(sched, x0, t, noise), t)
    chex.assert_equal_shape([model_output, x0])
    return _mean_flat((target - _f32(model_output)) ** 2)


def normal_kl(
    mean1: jax.Array, logvar1: jax.Array, mean2: jax.Array, logvar2: jax.Array
) -> jax.Array:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats."""
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
        + (mean1 - mean2) ** 2 * jnp.exp(-logvar2)
    )


def approx_standard_normal_cdf(x: jax.Array) -> jax.Array:
    """The tanh approximation of Φ(x) that the original code uses for the decoder."""
    return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(
    x: jax.Array, *, means: jax.Array, log_scales: jax.Array
) -> jax.Array:
    """log p(x) of 8-bit data x ∈ {-1, -1 + 2/255, ..., 1} under the discretized Gaussian decoder
    of eq. 13: the Gaussian's mass on [x - 1/255, x + 1/255], with the edge bins open-ended.
    """
    centered = _f32(x) - means
    inv_std = jnp.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    return jnp.where(
        x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta)
    )


def prior_bpd(sched: Schedule, x0: jax.Array) -> jax.Array:
    """L_T = KL(q(x_T | x_0) || N(0, I)) in bits per dimension, shape [B]."""
    t = jnp.full((x0.shape[0],), sched.num_timesteps - 1, dtype=jnp.int32)
    mean, _, log_variance = q_mean_variance(sched, x0, t)
    return _mean_flat(normal_kl(mean, log_variance, 0.0, 0.0)) / math.log(2.0)


def vb_terms_bpd(
    sched: Schedule,
    model_output: jax.Array,
    x0: jax.Array,
    x_t: jax.Array,
    t: jax.Array,
    *,
    mean_type: str = "eps",
    var_type: str = "fixedlarge",
    clip_denoised: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """One term of the bound (eq. 5) in bits/dim, shape [B], and the predicted x_0.

    L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p_θ(x_{t-1} | x_t)) for t > 1, and the decoder's
    L_0 = -log p_θ(x_0 | x_1) at t = 1 (index 0).
    """
    true_mean, _, true_log_variance = q_posterior(sched, x0, x_t, t)
    mean, _, log_variance, pred_x0 = p_mean_variance(
        sched, model_output, x_t, t,
        mean_type=mean_type, var_type=var_type, clip_denoised=clip_denoised,
    )
    kl = _mean_flat(normal_kl(true_mean, true_log_variance, mean, log_variance)) / math.log(2.0)
    decoder_nll = -_mean_flat(
        discretized_gaussian_log_likelihood(x0, means=mean, log_scales=0.5 * log_variance)
    ) / math.log(2.0)
    return jnp.where(t == 0, decoder_nll, kl), pred_x0


def bits_per_dim(
    sched: Schedule,
    model_fn: ModelFn,
    x0: jax.Array,
    rng: jax.Array,
    *,
    mean_type: str = "eps",
    var_type: str = "fixedlarge",
    clip_denoised: bool = True,
    timesteps_per_chunk: int = 1,
) -> dict[str, jax.Array]:
    """The negative variational bound (eq. 5) of 8-bit images ``x0`` ∈ [-1, 1], in bits/dim.

    Sums all T terms plus the prior: a lax.scan over chunks of ``timesteps_per_chunk`` timesteps,
    each chunk vmapped, so memory stays that of one chunk. Noise for timestep t comes from
    ``fold_in(rng, t)``. Returns per-example arrays: ``total_bpd`` [B], ``prior_bpd`` [B],
    ``terms_bpd`` [B, T] (index t is L_t in the paper's numbering minus one), and ``x0_mse``,
    ``eps_mse`` [B, T].
    """
    num_timesteps = sched.num_timesteps
    if timesteps_per_chunk <= 0 or num_timesteps % timesteps_per_chunk:
        raise ValueError(
            f"timesteps_per_chunk={timesteps_per_chunk} must be positive and divide "
            f"num_timesteps={num_timesteps}."
        )
    batch = x0.shape[0]
    x0 = _f32(x0)

    def one_timestep(t_scalar: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        t = jnp.full((batch,), t_scalar, dtype=jnp.int32)
        noise = jax.random.normal(jax.random.fold_in(rng, t_scalar), x0.shape, jnp.float32)
        x_t = q_sample(sched, x0, t, noise)
        model_output = _f32(model_fn(x_t, t))
        term, pred_x0 = vb_terms_bpd(
            sched, model_output, x0, x_t, t,
            mean_type=mean_type, var_type=var_type, clip_denoised=clip_denoised,
        )
        eps = predict_eps_from_x0(sched, x_t, t, pred_x0)
        return term, _mean_flat((pred_x0 - x0) ** 2), _mean_flat((eps - noise) ** 2)

    def chunk(carry: None, ts: jax.Array) -> tuple[None, tuple[jax.Array, ...]]:
        return carry, jax.vmap(one_timestep)(ts)

    ts = jnp.arange(num_timesteps, dtype=jnp.int32).reshape(-1, timesteps_per_chunk)
    _, (terms, x0_mse, eps_mse) = jax.lax.scan(chunk, None, ts)
    # [num_chunks, chunk, B] -> [B, T]
    terms, x0_mse, eps_mse = (a.reshape(num_timesteps, batch).T for a in (terms, x0_mse, eps_mse))
    prior = prior_bpd(sched, x0)
    return dict(
        total_bpd=jnp.sum(terms, axis=1) + prior,
        prior_bpd=prior,
        terms_bpd=terms,
        x0_mse=x0_mse,
        eps_mse=eps_mse,
    )
