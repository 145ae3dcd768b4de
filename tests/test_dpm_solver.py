"""ddpm_jax.dpm_solver: DPM-Solver++ against diffusers' DPMSolverMultistepScheduler (the [parity]
extra), against DDIM (its first order), and on Gaussian data, where the optimal predictor is
affine in x_t, so every chain is an affine map of (x_T, noise) whose moments are exact."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import diffusion, dpm_solver, sampling

T = 1000
MU, S = 0.5, 0.25  # the data distribution N(MU, S²) of the Gaussian tests
ABAR = np.cumprod(1.0 - np.linspace(1e-4, 0.02, T))


@pytest.fixture(scope="module")
def sched():
    return diffusion.make_schedule("linear", T)


def toy_model(x, t, mean_type="eps"):
    """A fixed nonlinear stand-in for a network, float64 NumPy: its x̂_0 is a bounded function of
    (x_t, t), given as ε, x_0 or v (so chains stay O(1), as real ones do)."""
    x, a = np.asarray(x, np.float64), ABAR[t]
    x0 = 0.8 * np.tanh(1.3 * x - t / T) + 0.1 * np.sin(3.0 * x + 5.0 * t / T)
    eps = (x - np.sqrt(a) * x0) / np.sqrt(1.0 - a)
    out = {"eps": eps, "x0": x0, "v": np.sqrt(a) * eps - np.sqrt(1.0 - a) * x0}[mean_type]
    return out.astype(np.float32)


def run_chain(sched, tables, model_fn, x, *, mean_type="eps", clip_denoised=False, noises=None,
              step=None):
    """The reference loop: x̂_0 from the model output on the schedule respaced to the chain's
    timesteps (chain index N-1-j), then ``step(j, x, x̂_0, history, noise)`` (default: the
    library's, eagerly). Returns every x [N+1]."""
    n = len(tables.timesteps)
    respaced = sampling.respace(sched, tables.timesteps[::-1])
    step = step or functools.partial(dpm_solver.step, tables)
    history, xs = dpm_solver.init_history(tables, x), [x]
    for j in range(n):
        t = jnp.full((x.shape[0],), tables.timesteps[j], jnp.int32)
        pred_x0 = diffusion.predict_x0(respaced, model_fn(x, t), x, jnp.full_like(t, n - 1 - j),
                                       mean_type)
        if clip_denoised:
            pred_x0 = jnp.clip(pred_x0, -1.0, 1.0)
        x, history = step(j, x, pred_x0, history, None if noises is None else noises[j])
        xs.append(x)
    return np.stack([np.asarray(x, np.float64) for x in xs])


# ----------------------------------------------------------------------------------------------
# Tables.
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_steps, order, expected", [
    (1, 1, [1]),
    (3, 2, [1, 2, 1]),
    (5, 3, [1, 2, 3, 2, 1]),
    (6, 3, [1, 2, 3, 3, 2, 1]),
    (14, 3, [1, 2] + [3] * 10 + [2, 1]),
    (15, 3, [1, 2] + [3] * 12 + [1]),  # from 15 steps on only the last step is lowered
    (16, 2, [1] + [2] * 14 + [1]),
])
def test_step_orders(sched, num_steps, order, expected):
    tables = dpm_solver.make_tables(sched, num_steps, order=order)
    np.testing.assert_array_equal(tables.orders, expected)
    # A step of order k weighs exactly k x̂_0.
    np.testing.assert_array_equal(np.count_nonzero(tables.coef_x0, axis=1), expected)


def test_tables_follow_the_float64_schedule(sched):
    tables = dpm_solver.make_tables(sched, 20, order=3, spacing="logsnr")
    abar = np.cumprod(1.0 - np.asarray(sched.betas, np.float64))[tables.timesteps]
    np.testing.assert_allclose(tables.alpha, np.append(np.sqrt(abar), 1.0), rtol=1e-12)
    np.testing.assert_allclose(tables.sigma, np.append(np.sqrt(1.0 - abar), 0.0), rtol=1e-12)
    np.testing.assert_allclose(tables.lambdas[:-1], 0.5 * np.log(abar / (1.0 - abar)), rtol=1e-12)
    assert tables.lambdas[-1] == np.inf and tables.timesteps[[0, -1]].tolist() == [T - 1, 0]
    # The last step lands on σ = 0: x' = x̂_0 exactly.
    assert tables.coef_x[-1] == 0 and tables.coef_x0[-1].tolist() == [1, 0, 0]
    np.testing.assert_array_equal(tables.coef_noise, 0)
    # The time spacing: round(k (T-1)/N) for k = N..1.
    np.testing.assert_array_equal(dpm_solver.make_tables(sched, 10).timesteps,
                                  [999, 899, 799, 699, 599, 500, 400, 300, 200, 100])


def test_errors(sched):
    def make(num_steps=10, **kw):
        dpm_solver.make_tables(sched, num_steps, **kw)

    for order in (0, 4, 2.5, "2", True):
        with pytest.raises(ValueError, match=r"order=.* choose one of 1, 2, 3\."):
            make(order=order)
    with pytest.raises(ValueError, match=r"order=3 is invalid for DPM-Solver\+\+ SDE.*1, 2\."):
        make(order=3, sde=True)
    with pytest.raises(ValueError, match="Unknown spacing 'karras'; choose one of time, logsnr"):
        make(spacing="karras")
    for num_steps, order in ((4, 3), (2, 2), (0, 1)):
        with pytest.raises(ValueError, match=rf"num_steps={num_steps} .* integer in "
                                             rf"\[{2 * order - 1}, 999\] \(order {order} needs "
                                             rf"at least {2 * order - 1} steps"):
            make(num_steps, order=order)
    with pytest.raises(ValueError, match=r"num_steps=1000 .* integer in \[1, 999\] \(at most 999 "
                                         r"distinct timesteps with time spacing\)"):
        make(T, order=1)
    with pytest.raises(ValueError, match=r"num_steps=2.0 .* give an integer in \[1, 999\]\.$"):
        make(2.0, order=1)
    with pytest.raises(ValueError, match="num_steps=50 with logsnr spacing repeats timesteps.*"
                                         "use at most 38 steps"):
        make(50, spacing="logsnr")
    make(38, spacing="logsnr")
    with pytest.raises(ValueError, match="logsnr spacing needs a finite log-SNR at t = T-1"):
        dpm_solver.make_tables(diffusion.make_schedule("jsd", T), 10, spacing="logsnr")
    make(T - 1, order=3)
    with pytest.raises(ValueError, match="concrete schedule"):
        jax.jit(lambda s: dpm_solver.make_tables(s, 10).coef_x)(sched)
    with pytest.raises(ValueError, match="needs noise"):
        tables = dpm_solver.make_tables(sched, 5, sde=True)
        dpm_solver.step(tables, 0, jnp.zeros(3), jnp.zeros(3), dpm_solver.init_history(
            tables, jnp.zeros(3)))


# ----------------------------------------------------------------------------------------------
# Mechanics: one compile, inside a lax.scan.
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("order, sde", [(3, False), (2, True)])
def test_scan_equals_the_loop_and_compiles_once(sched, order, sde):
    """A lax.scan over j (the shape of the library's chain) gives the reference loop's samples;
    the jitted step traces once for all j."""
    tables = dpm_solver.make_tables(sched, 12, order=order, sde=sde)
    respaced = sampling.respace(sched, tables.timesteps[::-1])
    n, shape = len(tables.timesteps), (3, 4, 4, 1)
    noises = jax.random.normal(jax.random.key(1), (n, *shape))
    x_T = jax.random.normal(jax.random.key(0), shape)

    def model_fn(x, t):
        a = jnp.asarray(ABAR, jnp.float32)[t][:, None, None, None]
        return (x - jnp.sqrt(a) * jnp.tanh(1.3 * x)) / jnp.sqrt(1.0 - a)

    @jax.jit
    def scan_chain(x):
        def body(carry, j):
            x, history = carry
            t = jnp.full((shape[0],), jnp.asarray(tables.timesteps)[j])
            pred_x0 = diffusion.predict_x0(respaced, model_fn(x, t), x, jnp.full_like(t, n - 1 - j))
            return dpm_solver.step(tables, j, x, pred_x0, history, noises[j]), None

        (x, _), _ = jax.lax.scan(body, (x, dpm_solver.init_history(tables, x)), jnp.arange(n))
        return x

    traces = []
    step = jax.jit(lambda *a: traces.append(1) or dpm_solver.step(tables, *a))
    x = run_chain(sched, tables, model_fn, x_T, noises=noises, step=step)[-1]
    assert len(traces) == 1
    np.testing.assert_allclose(scan_chain(x_T), x, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# Order 1 is DDIM with η = 0.
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spacing", dpm_solver.SPACINGS)
@pytest.mark.parametrize("clip_denoised", [False, True])
def test_first_order_is_ddim(sched, spacing, clip_denoised):
    """DPM-Solver++(1) from s to t: (σ_t/σ_s) x + α_t (1 - e^{-h}) x̂_0 = α_t x̂_0 + σ_t ε̂ with
    ε̂ = (x - α_s x̂_0)/σ_s, which is DDIM's eq. 12 at η = 0: the library's DDIM step on the
    schedule respaced to the same timesteps gives the same chain (its last step also lands on
    ᾱ = 1)."""
    tables = dpm_solver.make_tables(sched, 15, order=1, spacing=spacing)
    x_T = jax.random.normal(jax.random.key(2), (4, 3, 3, 2))

    def model_fn(x, t):
        return jnp.asarray(toy_model(x, np.asarray(t)[:, None, None, None]))

    ours = run_chain(sched, tables, model_fn, x_T, clip_denoised=clip_denoised)
    respaced, n = sampling.respace(sched, tables.timesteps[::-1]), len(tables.timesteps)
    x, ddim = x_T, [np.asarray(x_T, np.float64)]
    for j in range(n):
        i = jnp.full((x.shape[0],), n - 1 - j, jnp.int32)
        t = jnp.full((x.shape[0],), tables.timesteps[j], jnp.int32)
        x, _ = sampling._ddim_step(
            respaced, model_fn(x, t), x, i, jnp.zeros_like(x),
            mean_type="eps", var_type="fixedsmall", clip_denoised=clip_denoised, eta=0.0,
        )
        ddim.append(np.asarray(x, np.float64))
    np.testing.assert_allclose(ours, np.stack(ddim), atol=2e-5)


# ----------------------------------------------------------------------------------------------
# Gaussian data.
# ----------------------------------------------------------------------------------------------
def optimal_eps(x, t):
    """E[ε | x_t] for x_0 ~ N(MU, S²): sqrt(1-ᾱ_t)(x_t - sqrt(ᾱ_t) MU)/(ᾱ_t S² + 1 - ᾱ_t)."""
    a = jnp.asarray(ABAR, jnp.float32)[t].reshape(-1, *(1,) * (x.ndim - 1))
    return jnp.sqrt(1 - a) * (x - jnp.sqrt(a) * MU) / (a * S**2 + 1 - a)


def exact_output_moments(chain, num_steps, stochastic):
    """Mean and std of an affine chain's output x_0 = c x_T + d + Σ_j g_j z_j for x_T, z_j iid
    N(0, 1), from N + 2 one-pixel runs: x_T = 0 (d), x_T = 1 (c + d), one unit noise (d + g_j).
    (A fixed batch of 128 rows, so that eager ops compile once for every N.)"""
    x_T = jnp.zeros((128, 1)).at[1].set(1.0)
    noises = jnp.zeros((num_steps, 128, 1))
    noises = noises.at[jnp.arange(num_steps), jnp.arange(num_steps) + 2].set(1.0)
    out = chain(x_T, noises if stochastic else None)[:, 0]
    d, c, g = out[0], out[1] - out[0], out[2:num_steps + 2] - out[0]
    return d, np.sqrt(c**2 + (np.sum(g**2) if stochastic else 0.0))


def solver_moments(sched, num_steps, **kw):
    tables = dpm_solver.make_tables(sched, num_steps, **kw)
    return exact_output_moments(
        lambda x, z: run_chain(sched, tables, optimal_eps, x, noises=z)[-1], num_steps, tables.sde
    )


def ddim_moments(sched, num_steps):
    """The library's DDIM (η = 0) on its own respacing, as sampling.sample runs it."""
    steps = sampling.space_timesteps(T, num_steps)
    respaced = sampling.respace(sched, steps)

    def chain(x, _):
        for i in reversed(range(num_steps)):
            t = jnp.full((x.shape[0],), steps[i], jnp.int32)
            x, _ = sampling._ddim_step(
                respaced, optimal_eps(x, t), x, jnp.full_like(t, i), jnp.zeros_like(x),
                mean_type="eps", var_type="fixedsmall", clip_denoised=False, eta=0.0,
            )
        return np.asarray(x, np.float64)

    return exact_output_moments(chain, num_steps, False)


def ode_limit(sched):
    """The exact probability-flow ODE from x_T ~ N(0, 1) (not quite q(x_T)): it keeps
    (x - α MU)/sqrt(α² S² + σ²), so x_0 ~ N(MU - S α_T MU/s_T, (S/s_T)²), s_T² = α_T² S² + σ_T².
    The mean is -8.0e-4 off MU on this schedule: the prior's mismatch, which no step count cures."""
    abar = float(np.cumprod(1.0 - np.asarray(sched.betas, np.float64))[-1])
    s_T = np.sqrt(abar * S**2 + 1.0 - abar)
    return MU - S * np.sqrt(abar) * MU / s_T, S / s_T


# (spacing, order, sde): std error of the output against the data's S = 0.25, at 5/10/20/50/100
# steps, measured 2026-12-02 (float32 chain; the mean is within 1e-3 of MU throughout):
#   DDIM (library, space_timesteps)  -1.8e-1  -1.1e-1  -6.0e-2  -2.5e-2  -1.3e-2
#   time,   2                        -1.7e-1  -1.1e-1  -4.8e-2  -8.7e-3  -1.8e-3
#   time,   3                        -1.7e-1  -1.1e-1  -4.4e-2  -9.8e-3  -4.1e-3
#   time,   2, SDE                   -1.7e-1  -1.1e-1  -5.3e-2  -3.2e-3  +3.8e-3
#   logsnr, 2                        -5.6e-2  +5.8e-3  +3.6e-3      (over 38 steps the
#   logsnr, 3                        -2.6e-2  +3.9e-2  +1.7e-3       log-SNR spacing repeats
#   logsnr, 2, SDE                   -9.1e-2  +1.1e-3  +8.6e-3       timesteps on this schedule)
# The time spacing's error at 20 steps is almost all its last step: from t = 50 straight to
# x̂_0, the posterior mean E[x_0 | x_50], whose std is 18.2% (4.6e-2) below S; the log-SNR
# spacing's last model call is at t = 0, where that shrinkage is 0.08%.
@pytest.mark.parametrize("spacing, order, sde, steps", [
    ("time", 2, False, (10, 20, 50, 100)),
    ("time", 3, False, (10, 20, 50, 100)),
    ("time", 2, True, (10, 20, 50)),
    ("logsnr", 2, False, (5, 10)),
    ("logsnr", 3, False, (5, 20)),
])
def test_gaussian_moments_converge(sched, spacing, order, sde, steps):
    """The output std approaches the data's (the ODE: its exact flow's) as steps grow."""
    mean_limit, std_limit = (MU, S) if sde else ode_limit(sched)
    errors = []
    for n in steps:
        mean, std = solver_moments(sched, n, order=order, spacing=spacing, sde=sde)
        assert abs(mean - mean_limit) < 1e-3
        errors.append(abs(std - std_limit))
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False)), errors
    assert errors[-1] < 0.01


def test_gaussian_moments_at_20_steps_beat_ddim(sched):
    _, ddim_std = ddim_moments(sched, 20)
    for spacing in dpm_solver.SPACINGS:
        for order, sde in ((2, False), (3, False), (2, True)):
            mean, std = solver_moments(sched, 20, order=order, spacing=spacing, sde=sde)
            assert abs(std - S) < abs(ddim_std - S), (spacing, order, sde, std, ddim_std)
            assert abs(mean - MU) < 1e-3


# ----------------------------------------------------------------------------------------------
# Against diffusers' DPMSolverMultistepScheduler (the [parity] extra).
# ----------------------------------------------------------------------------------------------
PREDICTION_TYPES = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}


@pytest.fixture(scope="module")
def torch_diffusers():
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    return torch, diffusers.DPMSolverMultistepScheduler


def assert_parity(torch_diffusers, sched, *, num_steps, order, sde, spacing, mean_type):
    """Both solvers take the same x and model output at every step (ours' chain drives both), so
    every step's x_{j+1} is compared without compounding. diffusers' σ are set to ours: with the
    time spacing they agree anyway (checked, to its float32 cumprod), with the log-SNR spacing
    diffusers keeps the unrounded λ-uniform σ while calling the model at the rounded t; we use
    the table's σ at that t. The timesteps themselves are identical."""
    torch, scheduler_class = torch_diffusers
    tables = dpm_solver.make_tables(sched, num_steps, order=order, spacing=spacing, sde=sde)
    theirs = scheduler_class(
        num_train_timesteps=T, trained_betas=np.asarray(sched.betas), solver_order=order,
        prediction_type=PREDICTION_TYPES[mean_type],
        algorithm_type="sde-dpmsolver++" if sde else "dpmsolver++", lower_order_final=True,
        final_sigmas_type="zero", use_lu_lambdas=spacing == "logsnr",
    )
    theirs.set_timesteps(num_steps)
    np.testing.assert_array_equal(theirs.timesteps.numpy(), tables.timesteps)
    ve_sigmas = np.append(tables.sigma[:-1] / tables.alpha[:-1], 0.0)  # diffusers' σ/α
    if spacing == "time":
        np.testing.assert_allclose(theirs.sigmas.numpy(), ve_sigmas, rtol=1e-5)
    theirs.sigmas = torch.from_numpy(ve_sigmas.astype(np.float32))

    rng = np.random.default_rng(order)
    shape = (2, 3, 3, 2)
    respaced = sampling.respace(sched, tables.timesteps[::-1])
    step = jax.jit(functools.partial(dpm_solver.step, tables))
    x = rng.standard_normal(shape).astype(np.float32)
    history = dpm_solver.init_history(tables, jnp.asarray(x))
    for j, t in enumerate(tables.timesteps.tolist()):
        output, noise = toy_model(x, t, mean_type), rng.standard_normal(shape).astype(np.float32)
        i = jnp.full((shape[0],), num_steps - 1 - j, jnp.int32)
        pred_x0 = diffusion.predict_x0(respaced, output, x, i, mean_type)
        x_next, history = step(j, x, pred_x0, history, noise)
        expected = theirs.step(
            torch.from_numpy(output), t, torch.from_numpy(x), variance_noise=torch.from_numpy(noise)
        ).prev_sample.numpy()
        np.testing.assert_allclose(x_next, expected, rtol=1e-5, atol=1e-5,
                                   err_msg=f"step {j} (t={t})")
        x = np.array(x_next)


SOLVERS = [(1, False), (2, False), (3, False), (1, True), (2, True)]
# diffusers' own set_timesteps trips a NumPy 2 deprecation on torch tensors; not ours to fix.
diffusers_warning = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.mark.parity
@diffusers_warning
@pytest.mark.parametrize("order, sde", SOLVERS)
@pytest.mark.parametrize("spacing", dpm_solver.SPACINGS)
def test_parity_with_diffusers(torch_diffusers, sched, order, sde, spacing):
    """Every order, ODE and SDE, both spacings; 6 and 14 steps (lower-order final steps) and 20
    (only the last step lowered)."""
    for num_steps in (6, 14, 20):
        assert_parity(torch_diffusers, sched, num_steps=num_steps, order=order, sde=sde,
                      spacing=spacing, mean_type="eps")


@pytest.mark.parity
@diffusers_warning
@pytest.mark.parametrize("spacing", dpm_solver.SPACINGS)
def test_timesteps_match_diffusers(torch_diffusers, sched, spacing):
    """Every step count the log-SNR spacing allows on this schedule (1-38), and a range of time
    spacings up to T-1. One near-tie differs: with 26 log-SNR steps, step 13 lies at t = 264.49993
    (float64), which diffusers' float32 log σ table rounds up to 265."""
    _, scheduler_class = torch_diffusers
    theirs = scheduler_class(num_train_timesteps=T, trained_betas=np.asarray(sched.betas),
                             final_sigmas_type="zero", use_lu_lambdas=spacing == "logsnr")
    counts = range(1, 39) if spacing == "logsnr" else [*range(1, 40), 64, 100, 333, 500, T - 1]
    for num_steps in counts:
        theirs.set_timesteps(num_steps)
        expected = theirs.timesteps.numpy()
        if spacing == "logsnr" and num_steps == 26:
            assert expected[13] == 265
            expected[13] = 264
        np.testing.assert_array_equal(
            dpm_solver.make_tables(sched, num_steps, order=1, spacing=spacing).timesteps,
            expected, err_msg=f"{num_steps} steps",
        )


@pytest.mark.parity
@diffusers_warning
@pytest.mark.parametrize("mean_type", ["x0", "v"])
@pytest.mark.parametrize("order, sde", [(3, False), (2, True)])
def test_parity_with_diffusers_parameterisations(torch_diffusers, sched, mean_type, order, sde):
    assert_parity(torch_diffusers, sched, num_steps=8, order=order, sde=sde, spacing="logsnr",
                  mean_type=mean_type)
