"""ddpm_jax.sampling against closed forms: Gaussian data make the optimal ε-predictor analytic, and
every sampler driven by it is an affine map plus Gaussian noise, so its output moments follow
exactly from a float64 NumPy propagation written here, independently of the package."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import diffusion, sampling

T = 1000
MU, S = 0.5, 0.25  # the data distribution N(MU, S²), per pixel
BETAS = np.array([1e-4 + (0.02 - 1e-4) * i / (T - 1) for i in range(T)])
ALPHA_BAR = np.cumprod(1.0 - BETAS)


@pytest.fixture(scope="module")
def sched():
    return diffusion.make_schedule("linear", T)


def optimal_eps(x, t):
    """E[ε | x_t] for x_0 ~ N(MU, S²): sqrt(1-ᾱ_t)(x_t - sqrt(ᾱ_t) MU)/(ᾱ_t S² + 1 - ᾱ_t)."""
    a = jnp.asarray(ALPHA_BAR, jnp.float32)[t].reshape(-1, 1, 1, 1)
    return jnp.sqrt(1 - a) * (x - jnp.sqrt(a) * MU) / (a * S**2 + 1 - a)


def reference_timesteps(n):
    """improved-diffusion's space_timesteps(T, [n]) for one section, as written there."""
    frac_stride = (T - 1) / (n - 1)
    cur_idx, taken = 0.0, []
    for _ in range(n):
        taken.append(round(cur_idx))
        cur_idx += frac_stride
    return taken


def step_coefficients(timesteps, sampler, *, var_type="fixedlarge", eta=0.0):
    """Each step as x' = c x + d + σ z (ε* = A x + B is affine in x), from chain index n-1 down
    to 0, in float64: a list of (c, d, σ²)."""
    abar, coefficients = ALPHA_BAR[timesteps], []
    for i in reversed(range(len(timesteps))):
        a, a_prev = abar[i], (abar[i - 1] if i > 0 else 1.0)
        A = math.sqrt(1 - a) / (a * S**2 + 1 - a)
        B = -A * math.sqrt(a) * MU
        if sampler == "ddpm":  # eq. 11 with β' = 1 - ᾱ_t/ᾱ_{t-1} of the subsequence
            beta = 1 - a / a_prev
            k = beta / math.sqrt(1 - a)
            c, d = (1 - k * A) / math.sqrt(1 - beta), -k * B / math.sqrt(1 - beta)
            sigma2 = beta if var_type == "fixedlarge" else beta * (1 - a_prev) / (1 - a)
        else:  # Song et al. eqs. 12 and 16
            sigma2 = eta**2 * (1 - a_prev) / (1 - a) * (1 - a / a_prev)
            x0_c = (1 - math.sqrt(1 - a) * A) / math.sqrt(a)
            x0_d = -math.sqrt(1 - a) * B / math.sqrt(a)
            w = math.sqrt(max(1 - a_prev - sigma2, 0.0))
            c, d = math.sqrt(a_prev) * x0_c + w * A, math.sqrt(a_prev) * x0_d + w * B
        coefficients.append((c, d, sigma2 if i > 0 else 0.0))
    return coefficients


def exact_moments(timesteps, sampler, **kw):
    """Mean and variance of the output from x_T ~ N(0, 1): m' = c m + d, v' = c² v + σ².
    Also (c_total, d_total), the chain's deterministic part."""
    mean, var, c_total, d_total = 0.0, 1.0, 1.0, 0.0
    for c, d, sigma2 in step_coefficients(timesteps, sampler, **kw):
        mean, var = c * mean + d, c * c * var + sigma2
        c_total, d_total = c * c_total, c * d_total + d
    return mean, var, (c_total, d_total)


def assert_moments(x, mean, var, num_se=5.0):
    """Empirical mean/variance of iid Gaussian values within num_se standard errors."""
    x = np.asarray(x, np.float64).ravel()
    n = x.size
    np.testing.assert_allclose(x.mean(), mean, atol=num_se * math.sqrt(var / n))
    np.testing.assert_allclose(x.var(), var, atol=num_se * var * math.sqrt(2.0 / (n - 1)))


def jit_sample(sched, shape, **kw):
    """sample() jitted as a function of the key, closing over the schedule (the documented use)."""
    return jax.jit(lambda rng: sampling.sample(optimal_eps, sched, rng, shape, **kw))


# ----------------------------------------------------------------------------------------------
# Respacing.
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [2, 10, 50, 250, 333, 999, 1000])
def test_space_timesteps_follows_improved_diffusion(n):
    steps = sampling.space_timesteps(T, n)
    np.testing.assert_array_equal(steps, reference_timesteps(n))
    assert steps[0] == 0 and steps[-1] == T - 1 and len(np.unique(steps)) == n


def test_space_timesteps_edge_cases():
    np.testing.assert_array_equal(sampling.space_timesteps(T, 10), np.arange(0, 1000, 111))
    np.testing.assert_array_equal(sampling.space_timesteps(T, 1), [T - 1])
    np.testing.assert_array_equal(sampling.space_timesteps(T, T), np.arange(T))
    for bad in (0, T + 1, 2.5):
        with pytest.raises(ValueError, match="num_steps"):
            sampling.space_timesteps(T, bad)


def test_respaced_schedule(sched):
    steps = np.array(reference_timesteps(25))
    new = sampling.respace(sched, steps)
    abar_prev = np.append(1.0, ALPHA_BAR[steps][:-1])
    np.testing.assert_allclose(new.alphas_cumprod, ALPHA_BAR[steps], rtol=2e-6)
    beta = 1 - ALPHA_BAR[steps] / abar_prev
    np.testing.assert_allclose(new.betas, beta, rtol=2e-6)
    np.testing.assert_allclose(
        new.posterior_variance, beta * (1 - abar_prev) / (1 - ALPHA_BAR[steps]), rtol=2e-6
    )
    # Keeping every step changes nothing.
    full = sampling.respace(sched, np.arange(T))
    for name in ("betas", "alphas_cumprod", "posterior_mean_coef1", "posterior_mean_coef2"):
        np.testing.assert_allclose(getattr(full, name), getattr(sched, name), rtol=2e-6)


# ----------------------------------------------------------------------------------------------
# Correctness on Gaussian data.
# ----------------------------------------------------------------------------------------------
MOMENT_SHAPE = (2048, 8, 8, 1)  # 131,072 iid values per chain
CHAINS = {  # name: (sampler, num_steps, kwargs)
    "ddpm-1000-fixedlarge": ("ddpm", None, dict(var_type="fixedlarge")),
    "ddpm-10-fixedlarge": ("ddpm", 10, dict(var_type="fixedlarge")),
    "ddpm-25-fixedsmall": ("ddpm", 25, dict(var_type="fixedsmall")),
    "ddim-50-eta0": ("ddim", 50, dict(eta=0.0)),
    "ddim-10-eta1": ("ddim", 10, dict(eta=1.0)),
    "ddim-20-eta0.5": ("ddim", 20, dict(eta=0.5)),
}


@pytest.fixture(scope="module")
def chain_samples(sched):
    """Every chain of CHAINS on Gaussian data, in one compiled program (compiles are the cost)."""

    def all_chains(rng):
        return {
            name: sampling.sample(
                optimal_eps, sched, jax.random.fold_in(rng, k), MOMENT_SHAPE, sampler=sampler,
                num_steps=num_steps, clip_denoised=False, **kw,
            )
            for k, (name, (sampler, num_steps, kw)) in enumerate(CHAINS.items())
        }

    return jax.device_get(jax.jit(all_chains)(jax.random.key(0)))


def test_full_ancestral_chain_recovers_the_data_distribution(chain_samples):
    x = np.asarray(chain_samples["ddpm-1000-fixedlarge"], np.float64)
    assert abs(x.mean() - MU) < 0.01 * MU and abs(x.std() - S) < 0.01 * S


@pytest.mark.parametrize("name", CHAINS)
def test_chains_match_exact_moments(chain_samples, name):
    sampler, num_steps, kw = CHAINS[name]
    steps = np.arange(T) if num_steps is None else reference_timesteps(num_steps)
    mean, var, _ = exact_moments(steps, sampler, **kw)
    assert_moments(chain_samples[name], mean, var)


def test_moment_test_separates_discretization_from_bugs():
    """50 DDIM steps really return a std several % low; the tolerance is far tighter than that."""
    _, var, _ = exact_moments(reference_timesteps(50), "ddim")
    assert 0.03 < 1 - math.sqrt(var) / S < 0.15
    n = math.prod(MOMENT_SHAPE)
    assert 5 * var * math.sqrt(2.0 / n) < 0.1 * abs(var - S**2)


def key(seed):
    """An rbg key: it compiles seconds faster than threefry on CPU. The samplers are agnostic to
    the key's implementation; ``chain_samples`` runs with the default threefry keys."""
    return jax.random.key(seed, impl="rbg")


def test_ddim_eta0_is_the_exact_affine_map_of_x_T(sched):
    x, traj = jit_sample(
        sched, (64, 4, 4, 1), sampler="ddim", num_steps=20, clip_denoised=False,
        return_trajectory=True,
    )(key(3))
    _, _, (c, d) = exact_moments(reference_timesteps(20), "ddim")
    np.testing.assert_allclose(x, c * np.asarray(traj.x_t[0], np.float64) + d, atol=2e-5)


def test_ddim_eta1_is_ancestral_sampling_with_fixedsmall_variance(sched):
    def both(rng):
        return [
            (
                sampling.sample(optimal_eps, sched, rng, (16, 4, 4, 1), sampler="ddim", eta=1.0,
                                num_steps=15, clip_denoised=clip),
                sampling.sample(optimal_eps, sched, rng, (16, 4, 4, 1), sampler="ddpm",
                                var_type="fixedsmall", num_steps=15, clip_denoised=clip),
            )
            for clip in (False, True)
        ]

    for ddim, ddpm in jax.jit(both)(key(7)):
        np.testing.assert_allclose(ddim, ddpm, atol=5e-5)


def test_x0_and_v_parameterisations_give_the_same_chains(sched):
    """The optimal x_0- and v-predictors (converted from ε* in float64 terms) drive every sampler
    to the same samples as ε* itself."""

    def predictor(mean_type):
        def fn(x, t):
            a = jnp.asarray(ALPHA_BAR, jnp.float32)[t].reshape(-1, 1, 1, 1)
            eps = optimal_eps(x, t)
            x0 = (x - jnp.sqrt(1 - a) * eps) / jnp.sqrt(a)
            return {"eps": eps, "x0": x0, "v": jnp.sqrt(a) * eps - jnp.sqrt(1 - a) * x0}[mean_type]

        return fn

    def chains(rng):
        return {
            (sampler, mean_type): sampling.sample(
                predictor(mean_type), sched, rng, (4, 4, 4, 1), sampler=sampler, num_steps=5,
                mean_type=mean_type, clip_denoised=False,
            )
            for sampler in ("ddpm", "ddim")
            for mean_type in ("eps", "x0", "v")
        }

    out = jax.jit(chains)(key(4))
    for sampler in ("ddpm", "ddim"):
        for mean_type in ("x0", "v"):
            np.testing.assert_allclose(out[sampler, mean_type], out[sampler, "eps"], atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Mechanics.
# ----------------------------------------------------------------------------------------------
def test_same_rng_same_samples(sched):
    fn = jit_sample(sched, (4, 4, 4, 2), sampler="ddpm", num_steps=8)
    a, b, c = fn(key(1)), fn(key(1)), fn(key(2))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_eps_fn_sees_the_original_timesteps(sched):
    seen = []

    def model_fn(x, t):
        jax.debug.callback(lambda t: seen.append(np.asarray(t)), t, ordered=True)
        return optimal_eps(x, t)

    jax.jit(
        lambda rng: sampling.sample(model_fn, sched, rng, (2, 2, 2, 1), sampler="ddim",
                                    num_steps=10)
    )(key(0))
    jax.effects_barrier()
    assert [int(t[0]) for t in seen] == reference_timesteps(10)[::-1]
    assert all(t.dtype == np.int32 and t.shape == (2,) and (t == t[0]).all() for t in seen)


@pytest.mark.parametrize("sampler,num_steps,every", [("ddpm", 10, 3), ("ddim", 12, None)])
def test_shapes_dtypes_and_trajectory(sched, sampler, num_steps, every):
    shape = (3, 5, 4, 2)

    def run(rng):
        kw = dict(sampler=sampler, num_steps=num_steps)
        x, traj = sampling.sample(
            optimal_eps, sched, rng, shape, return_trajectory=True, trajectory_every=every, **kw
        )
        x_only = sampling.sample(optimal_eps, sched, rng, shape, **kw)
        return x, traj, x_only, jax.random.normal(jax.random.split(rng)[0], shape)

    x, traj, x_only, x_T = jax.jit(run)(key(11))
    k = every or max(1, num_steps // 10)
    frames = math.ceil(num_steps / k)
    assert x.shape == shape and x.dtype == jnp.float32
    assert traj.x_t.shape == traj.pred_x0.shape == (frames, *shape)
    assert traj.x_t.dtype == traj.pred_x0.dtype == jnp.float32
    np.testing.assert_array_equal(traj.timesteps, reference_timesteps(num_steps)[::-1][::k])
    # Frame 0 is x_T, the clipped x_0 estimates stay in [-1, 1], and the trajectory leaves x alone.
    np.testing.assert_array_equal(traj.x_t[0], x_T)
    assert np.abs(traj.pred_x0).max() <= 1.0 and np.abs(traj.pred_x0[-1]).max() > 0
    np.testing.assert_array_equal(x, x_only)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_every_step_follows_its_update_rule(sched, sampler):
    """With every frame kept, x_t[j+1] = c x_t[j] + d + σ z_i, z_i = N(fold_in(split(rng)[1], i))
    the documented noise of chain index i = n-1-j; the last step adds none."""
    n, shape = 6, (2, 3, 3, 1)
    kw = dict(eta=0.3) if sampler == "ddim" else {}

    def run(rng):
        x, traj = sampling.sample(
            optimal_eps, sched, rng, shape, sampler=sampler, num_steps=n, clip_denoised=False,
            return_trajectory=True, trajectory_every=1, **kw,
        )
        noise_key = jax.random.split(rng)[1]
        noise = [jax.random.normal(jax.random.fold_in(noise_key, i), shape) for i in range(n)]
        return x, traj.x_t, noise

    x, x_t, noise = jax.device_get(jax.jit(run)(key(5)))
    states = np.concatenate([np.asarray(x_t, np.float64), x[None]])
    for j, (c, d, sigma2) in enumerate(step_coefficients(reference_timesteps(n), sampler, **kw)):
        expected = c * states[j] + d + math.sqrt(sigma2) * noise[n - 1 - j]
        np.testing.assert_allclose(states[j + 1], expected, atol=3e-5)


@pytest.mark.parametrize("sampler, kw", [
    ("ddpm", dict(var_type="fixedlarge")),  # crashed at trace time: no β̃_2 in a 1-step schedule
    ("ddpm", dict(var_type="fixedsmall")),
    ("ddim", dict(eta=0.0)),
    ("ddim", dict(eta=1.0)),
])
@pytest.mark.parametrize("clip", [False, True])
def test_one_step_chain_is_the_clipped_x0_prediction_at_T(sched, sampler, kw, clip):
    """One step: the chain's only timestep is T-1 with ᾱ'_prev = 1, so its posterior mean is x̂_0
    itself (coefficients 1 and 0), every σ² is 0 (eq. 16 with ᾱ_{t-1} = 1; the last step adds no
    noise anyway), and the sample is x̂_0(x_T, T-1) = (x_T - sqrt(1-ᾱ) ε*)/sqrt(ᾱ), clipped when
    asked; computed here in float64 from the documented x_T = N(split(rng)[0])."""
    rng = key(7)
    shape = (4, 3, 3, 1)
    x = sampling.sample(optimal_eps, sched, rng, shape, sampler=sampler, num_steps=1,
                        clip_denoised=clip, **kw)
    x_T = np.asarray(jax.random.normal(jax.random.split(rng)[0], shape), np.float64)
    a = ALPHA_BAR[T - 1]
    eps = math.sqrt(1 - a) * (x_T - math.sqrt(a) * MU) / (a * S**2 + 1 - a)
    expected = (x_T - math.sqrt(1 - a) * eps) / math.sqrt(a)
    if clip:
        expected = np.clip(expected, -1.0, 1.0)
    assert np.abs(expected).max() > 0.1  # not trivially zero
    np.testing.assert_allclose(np.asarray(x, np.float64), expected, rtol=1e-4, atol=1e-4)


def test_compiles_once(sched):
    traces = []

    def model_fn(x, t):
        traces.append(1)
        return optimal_eps(x, t)

    fn = jax.jit(lambda rng: sampling.sample(model_fn, sched, rng, (2, 4, 4, 1), num_steps=100))
    fn(key(0)).block_until_ready()
    fn(key(1)).block_until_ready()
    assert len(traces) == 1  # one trace of the scan body for 100 steps and two calls


def test_errors(sched):
    shape = (2, 4, 4, 1)
    with pytest.raises(ValueError, match="sampler"):
        sampling.sample(optimal_eps, sched, key(0), shape, sampler="euler")
    with pytest.raises(ValueError, match="eta"):
        sampling.sample(optimal_eps, sched, key(0), shape, sampler="ddpm", eta=1.0)
    with pytest.raises(ValueError, match="var_type"):
        sampling.sample(optimal_eps, sched, key(0), shape, var_type="learned")
    with pytest.raises(ValueError, match="num_steps"):
        sampling.sample(optimal_eps, sched, key(0), shape, num_steps=T + 1)
    with pytest.raises(ValueError, match="concrete schedule"):
        jax.jit(
            lambda s: sampling.sample(optimal_eps, s, key(0), shape, num_steps=10)
        )(sched)


class _TinyModel(nn.Module):
    """Stands in for the UNet: the same apply signature, a class embedding when conditional."""

    num_classes: int | None = None

    @nn.compact
    def __call__(self, x, t, y=None, train=False):
        h = nn.Dense(x.shape[-1])(x) + t[:, None, None, None] / 1000.0
        if self.num_classes is not None:
            h = h + nn.Embed(self.num_classes, x.shape[-1])(y)[:, None, None, :]
        return h


@pytest.mark.parametrize("num_classes", [None, 10])
def test_make_model_fn(num_classes):
    model = _TinyModel(num_classes)
    x, t = jnp.ones((2, 4, 4, 3)), jnp.array([3, 999], jnp.int32)
    y = None if num_classes is None else jnp.array([1, 7], jnp.int32)
    params = jax.jit(model.init)(key(0), x, t, y)["params"]
    model_fn = sampling.make_model_fn(model, params, y)
    np.testing.assert_array_equal(model_fn(x, t), model.apply({"params": params}, x, t, y))
    with pytest.raises(ValueError, match="num_classes"):
        sampling.make_model_fn(model, params, jnp.zeros(2, jnp.int32) if y is None else None)
