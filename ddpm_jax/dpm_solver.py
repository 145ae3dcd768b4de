"""DPM-Solver++ multistep (Lu et al. 2022b, "DPM-Solver++: Fast Solver for Guided Sampling of
Diffusion Probabilistic Models") and its SDE variant, on the model's discrete-time schedule.

With α_t = sqrt(ᾱ_t), σ_t = sqrt(1 - ᾱ_t) and λ_t = log α_t - log σ_t (half the log-SNR), the
diffusion ODE written with the data prediction x_θ(x_t, t) = x̂_0 has the exact solution
(Lu et al. 2022b, Sec. 4; the counterpart of Lu et al. 2022a's eq. 3.4 for ε)

    x_t = (σ_t/σ_s) x_s + σ_t ∫_{λ_s}^{λ_t} e^λ x_θ(x_λ, λ) dλ.

DPM-Solver++ replaces x_θ by the polynomial in λ through the x̂_0 of the last k points (k = the
order, "multistep") and integrates it exactly; k = 1 is DDIM with η = 0. With h = λ_t - λ_s and
φ_1 = e^{-h} - 1, the update from point s to t is

    x_t = (σ_t/σ_s) x_s - α_t φ_1 D_0 + w_1 D_1 + w_2 D_2

where D_0 = x̂_0(s) and D_1, D_2 are divided differences of the earlier x̂_0 (``_coefficients``).
Everything but the x̂_0 depends on the schedule only, so each step is an affine combination

    x_{j+1} = a_j x_j + b_j0 x̂_0(j) + b_j1 x̂_0(j-1) + b_j2 x̂_0(j-2) + c_j z_j

whose coefficients ``make_tables`` computes once in float64 NumPy. ``step`` applies them with the
step index j traced: one compile for every order and step count, inside one ``lax.scan``.

The chain: ``make_tables(sched, num_steps, order=, spacing=, sde=)`` picks N integer timesteps
(``tables.timesteps``, noisiest first; the model is called with these original indices), then
step j = 0..N-1 goes from timestep ``timesteps[j]`` to the next, and the last step goes to σ = 0,
so the chain ends on the model's x̂_0 at its last timestep (diffusers' ``final_sigmas_type=
"zero"``). The caller turns the model output into x̂_0 (ε, x_0 or v; clipped if it wants, as the
other samplers do) with ``diffusion.predict_x0`` on the schedule respaced to
``tables.timesteps[::-1]`` at chain index N-1-j, and keeps the history of past x̂_0::

    history = init_history(tables, x)
    for j in range(N):                      # the body of a lax.scan
        x0 = predict_x0(model_fn(x, tables.timesteps[j]), x, ...)
        x, history = step(tables, j, x, x0, history, noise_j)
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import diffusion

SPACINGS = ("time", "logsnr")
ORDERS = (1, 2, 3)
SDE_ORDERS = (1, 2)
# Below this many steps the last steps use lower orders (diffusers' lower_order_final threshold;
# Lu et al.'s reference implementation uses 10): it stabilises very short chains.
LOWER_ORDER_FINAL_BELOW = 15


class SolverTables(NamedTuple):
    """Per-step float64 tables of an N-step chain (concrete NumPy: close over them in a jit).

    Points are 0..N: point j < N is ``timesteps[j]``, point N the clean end (α = 1, σ = 0,
    λ = ∞). Step j goes from point j to point j+1 as
    ``x' = coef_x[j] x + coef_x0[j] · (x̂_0 of points j, j-1, ...) + coef_noise[j] z``.
    """

    timesteps: np.ndarray  # int32 [N], descending: the model's t at step j
    alpha: np.ndarray  # float64 [N+1]
    sigma: np.ndarray  # float64 [N+1]
    lambdas: np.ndarray  # float64 [N+1], λ = log α - log σ (∞ at point N)
    orders: np.ndarray  # int32 [N], the order step j uses (<= the requested order)
    coef_x: np.ndarray  # float64 [N]
    coef_x0: np.ndarray  # float64 [N, order]: weights of x̂_0 at points j, j-1, j-2
    coef_noise: np.ndarray  # float64 [N], all zero for the ODE solver
    sde: bool  # whether step needs noise (DPM-Solver++ SDE)


# ----------------------------------------------------------------------------------------------
# Validation and step selection.
# ----------------------------------------------------------------------------------------------
def min_steps(order: int) -> int:
    """The fewest steps with which an order-k chain takes at least one order-k step: 2k - 1.

    The first k-1 steps lack the history for order k, and below LOWER_ORDER_FINAL_BELOW steps
    the last k-1 steps lower their order again (the last step is always first order), so fewer
    steps would silently run a lower-order solver; that is an error instead of diffusers' silent
    lowering.
    """
    return 2 * order - 1


def check_solver_args(
    num_timesteps: int, *, num_steps: int, order: int, spacing: str, sde: bool = False
) -> None:
    """Raise one ValueError for settings ``make_tables`` would reject, before anything is built.

    The log-SNR spacing can also repeat timesteps for step counts close to T; only
    ``make_tables`` (which has the schedule) detects that.
    """
    allowed = SDE_ORDERS if sde else ORDERS
    name = "DPM-Solver++ SDE" if sde else "DPM-Solver++"
    if isinstance(order, bool) or order not in allowed:
        raise ValueError(
            f"order={order!r} is invalid for {name}: choose one of "
            f"{', '.join(map(str, allowed))}."
        )
    if spacing not in SPACINGS:
        raise ValueError(f"Unknown spacing {spacing!r}; choose one of {', '.join(SPACINGS)}.")
    # The time spacing rounds N+1 evenly spaced points of [0, T-1]: distinct up to N = T-1.
    most = num_timesteps - 1 if spacing == "time" else num_timesteps
    least = min_steps(order)
    integer = isinstance(num_steps, (int, np.integer)) and not isinstance(num_steps, bool)
    if not integer or not least <= num_steps <= most:
        why = ""
        if integer:
            why = (
                f" (order {order} needs at least {least} steps to take one step of that order)"
                if num_steps < least
                else f" (at most {most} distinct timesteps with {spacing} spacing)"
            )
        raise ValueError(
            f"num_steps={num_steps!r} is invalid for {name} of order {order} on a "
            f"{num_timesteps}-step schedule: give an integer in [{least}, {most}]{why}."
        )


def solver_timesteps(alphas_cumprod: np.ndarray, num_steps: int, spacing: str) -> np.ndarray:
    """N integer timesteps of 0..T-1, descending, from the float64 ᾱ table.

    "time": round(k (T-1)/N) for k = N..1, i.e. N+1 evenly spaced times from T-1 to 0 whose last
    (t = 0) is replaced by the clean end (diffusers' ``timestep_spacing="linspace"``).
    "logsnr": N values of λ evenly spaced from λ_{T-1} to λ_0, each mapped to the time where
    the table's λ, linearly interpolated, takes it, rounded (diffusers' ``use_lu_lambdas``): it
    ends at t = 0. Rounding half to even, as NumPy (and diffusers) does.
    """
    num_timesteps = len(alphas_cumprod)
    if spacing == "time":
        times = np.linspace(0, num_timesteps - 1, num_steps + 1)[::-1][:-1]
    else:
        lambdas = 0.5 * (np.log(alphas_cumprod) - np.log1p(-alphas_cumprod))  # decreasing in t
        targets = np.linspace(lambdas[-1], lambdas[0], num_steps)
        times = np.interp(-targets, -lambdas, np.arange(num_timesteps))
    return np.round(times).astype(np.int32)


def _repeats(timesteps: np.ndarray) -> bool:
    return bool(np.any(np.diff(timesteps) >= 0))


def step_orders(num_steps: int, order: int) -> np.ndarray:
    """The order of each step: min(order, j + 1) (the history available), the last step first
    order (it lands on σ = 0, λ = ∞, where a polynomial in λ cannot be integrated; the exact
    solution there is x̂_0 itself), and with fewer than LOWER_ORDER_FINAL_BELOW steps also
    at most the number of steps left (diffusers' ``lower_order_final``)."""
    j = np.arange(num_steps)
    left = num_steps - j
    final = left if num_steps < LOWER_ORDER_FINAL_BELOW else np.where(left == 1, 1, order)
    return np.minimum(np.minimum(order, j + 1), final).astype(np.int32)


# ----------------------------------------------------------------------------------------------
# The tables.
# ----------------------------------------------------------------------------------------------
def _coefficients(
    lambdas: np.ndarray, alpha: np.ndarray, sigma: np.ndarray, j: int, order: int, sde: bool
) -> tuple[float, np.ndarray, float]:
    """Step j of order k as (a, b, c): x_{j+1} = a x_j + b · (x̂_0(j), x̂_0(j-1), x̂_0(j-2)) + c z.

    The divided differences, as weight vectors over the three x̂_0 (e_i picks x̂_0(j-i)), with
    h = λ_{j+1} - λ_j, r_0 = (λ_j - λ_{j-1})/h, r_1 = (λ_{j-1} - λ_{j-2})/h:
    D_0 = e_0; D_1 = (e_0 - e_1)/r_0 at order 2 (Lu et al. 2022b, Alg. 2); at order 3
    D_1 = d_0 + r_0/(r_0 + r_1) (d_0 - d_1) and D_2 = (d_0 - d_1)/(r_0 + r_1) with
    d_0 = (e_0 - e_1)/r_0, d_1 = (e_1 - e_2)/r_1 (the third-order multistep update of Lu et al.
    2022a/b's reference implementation, in data prediction).

    ODE: a = σ_{j+1}/σ_j and, with φ_1 = e^{-h} - 1, the x̂_0 weights are α_{j+1} times
    -φ_1 (D_0 + D_1/2) at order <= 2 (Alg. 2; order 1 is DDIM) and
    -φ_1 D_0 + (φ_1/h + 1) D_1 - ((φ_1 + h)/h² - 1/2) D_2 at order 3; c = 0.
    SDE (DPM-Solver++(2M) SDE, the SDE counterpart of Alg. 2 in Lu et al.'s and diffusers'
    implementations): a = (σ_{j+1}/σ_j) e^{-h}, weights α_{j+1} (1 - e^{-2h}) (D_0 + D_1/2),
    c = σ_{j+1} sqrt(1 - e^{-2h}).
    """
    h = lambdas[j + 1] - lambdas[j]
    e = np.eye(3)
    differences = [e[0]]
    if order >= 2:
        r0 = (lambdas[j] - lambdas[j - 1]) / h
        differences.append((e[0] - e[1]) / r0)
    if order == 3:
        r1 = (lambdas[j - 1] - lambdas[j - 2]) / h
        d0, d1 = differences[1], (e[1] - e[2]) / r1
        differences[1:] = [d0 + r0 / (r0 + r1) * (d0 - d1), (d0 - d1) / (r0 + r1)]
    ratio = sigma[j + 1] / sigma[j]
    if sde:
        one_minus_e2h = -np.expm1(-2.0 * h)
        a, c = ratio * np.exp(-h), sigma[j + 1] * np.sqrt(one_minus_e2h)
        weights = [one_minus_e2h, one_minus_e2h / 2]
    else:
        phi1 = np.expm1(-h)
        a, c = ratio, 0.0
        weights = [-phi1, -phi1 / 2]
        if order == 3:
            weights = [-phi1, phi1 / h + 1, -((phi1 + h) / h**2 - 0.5)]
    b = alpha[j + 1] * sum(w * d for w, d in zip(weights, differences, strict=False))
    return a, b, c


def make_tables(
    sched: diffusion.Schedule,
    num_steps: int,
    *,
    order: int = 2,
    spacing: str = "time",
    sde: bool = False,
) -> SolverTables:
    """The float64 tables of an N-step DPM-Solver++ chain of ``order`` (1-3; the SDE variant
    1-2) on ``sched``, with ``spacing`` "time" or "logsnr" (``solver_timesteps``).

    ᾱ is recomputed in float64 from the stored β (as ``sampling.respace`` does), and α, σ, λ of
    every point come from it. Raises ValueError for bad settings (``check_solver_args``) or a
    log-SNR spacing whose rounded timesteps repeat.
    """
    if isinstance(sched.betas, jax.core.Tracer):
        raise ValueError(
            "DPM-Solver++ tables need a concrete schedule: close over `sched` instead of passing "
            "it as an argument of a jitted function."
        )
    check_solver_args(
        sched.num_timesteps, num_steps=num_steps, order=order, spacing=spacing, sde=sde
    )
    alphas_cumprod = np.cumprod(1.0 - np.asarray(sched.betas, dtype=np.float64))
    if spacing == "logsnr" and alphas_cumprod[-1] == 0:
        raise ValueError(
            "The logsnr spacing needs a finite log-SNR at t = T-1, but this schedule ends at "
            "ᾱ = 0 (β_T = 1, e.g. 'jsd'); use the time spacing."
        )
    timesteps = solver_timesteps(alphas_cumprod, num_steps, spacing)
    if _repeats(timesteps):
        most = next(n for n in range(1, num_steps) if _repeats(
            solver_timesteps(alphas_cumprod, n + 1, spacing)))
        raise ValueError(
            f"num_steps={num_steps} with {spacing} spacing repeats timesteps on this "
            f"{sched.num_timesteps}-step schedule (λ changes by more than one step's share "
            f"between two integer timesteps): use at most {most} steps, or the time spacing."
        )
    alphas_cumprod = alphas_cumprod[timesteps]
    alpha = np.append(np.sqrt(alphas_cumprod), 1.0)
    sigma = np.append(np.sqrt(1.0 - alphas_cumprod), 0.0)
    with np.errstate(divide="ignore"):
        lambdas = np.log(alpha) - np.log(sigma)
    orders = step_orders(num_steps, order)
    coef_x, coef_x0, coef_noise = np.zeros(num_steps), np.zeros((num_steps, 3)), np.zeros(num_steps)
    for j in range(num_steps):
        coef_x[j], coef_x0[j], coef_noise[j] = _coefficients(
            lambdas, alpha, sigma, j, orders[j], sde
        )
    return SolverTables(
        timesteps=timesteps, alpha=alpha, sigma=sigma, lambdas=lambdas, orders=orders,
        coef_x=coef_x, coef_x0=coef_x0[:, :order], coef_noise=coef_noise, sde=sde,
    )


# ----------------------------------------------------------------------------------------------
# The step.
# ----------------------------------------------------------------------------------------------
History = tuple[jax.Array, ...]


def init_history(tables: SolverTables, x: jax.Array) -> History:
    """The x̂_0 of the previous order - 1 points, zeros before the chain starts (their weights
    are zero until they are filled)."""
    return (jnp.zeros_like(x),) * (tables.coef_x0.shape[1] - 1)


def step(
    tables: SolverTables,
    j: jax.Array | int,
    x: jax.Array,
    pred_x0: jax.Array,
    history: History,
    noise: jax.Array | None = None,
) -> tuple[jax.Array, History]:
    """Step j (traceable) from point j to j+1: x' = a_j x + Σ_i b_ji x̂_0(j-i) + c_j z.

    ``pred_x0`` is x̂_0 at point j (already clipped if the caller clips), ``history`` the x̂_0 of
    the previous points (``init_history`` at j = 0), ``noise`` z ~ N(0, I) of x's shape, needed
    by the SDE variant only (the ODE ignores it). Returns x at point j+1 and the new history.
    """
    if tables.sde and noise is None:
        raise ValueError("DPM-Solver++ SDE needs noise at every step; got noise=None.")

    def at(table: np.ndarray) -> jax.Array:
        return jnp.asarray(table, jnp.float32)[j]

    x_next = at(tables.coef_x) * x
    for i, x0 in enumerate((pred_x0, *history)):
        x_next = x_next + at(tables.coef_x0[:, i]) * x0
    if tables.sde:
        x_next = x_next + at(tables.coef_noise) * noise
    return x_next, (pred_x0, *history)[: len(history)]
