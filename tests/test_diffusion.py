"""ddpm_jax.diffusion against independent float64 NumPy computations and closed forms."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import diffusion

T = 1000


def reference_betas(name, num_timesteps=T, beta_start=1e-4, beta_end=0.02):
    """The schedules written out element by element, in float64."""
    n = num_timesteps
    if name == "linear":
        return np.array([beta_start + (beta_end - beta_start) * i / (n - 1) for i in range(n)])
    if name == "quad":
        a, b = math.sqrt(beta_start), math.sqrt(beta_end)
        return np.array([(a + (b - a) * i / (n - 1)) ** 2 for i in range(n)])
    if name == "const":
        return np.array([beta_end] * n)
    if name == "jsd":
        return np.array([1.0 / (n - i) for i in range(n)])
    if name in ("warmup10", "warmup50"):
        w = int(n * (0.1 if name == "warmup10" else 0.5))
        return np.array(
            [beta_start + (beta_end - beta_start) * i / (w - 1) if i < w else beta_end
             for i in range(n)]
        )
    if name == "cosine":
        def f(u):
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
        return np.array([min(1 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)])
    if name == "sigmoid":
        return np.array(
            [beta_start + (beta_end - beta_start) / (1 + math.exp(-(-6 + 12 * i / (n - 1))))
             for i in range(n)]
        )
    raise AssertionError(name)


def reference_tables(betas):
    """Every table by explicit loops over t (paper notation, t = index + 1)."""
    n = len(betas)
    abar = np.empty(n)
    prod = 1.0
    for i, b in enumerate(betas):
        prod *= 1.0 - b
        abar[i] = prod
    abar_prev = np.array([1.0] + list(abar[:-1]))
    post_var = np.array([betas[i] * (1 - abar_prev[i]) / (1 - abar[i]) for i in range(n)])
    return dict(
        betas=betas,
        alphas=1 - betas,
        alphas_cumprod=abar,
        alphas_cumprod_prev=abar_prev,
        sqrt_alphas_cumprod=np.sqrt(abar),
        sqrt_one_minus_alphas_cumprod=np.sqrt(1 - abar),
        log_one_minus_alphas_cumprod=np.log(1 - abar),
        sqrt_recip_alphas_cumprod=1 / np.sqrt(abar),
        sqrt_recipm1_alphas_cumprod=np.sqrt(1 / abar - 1),
        posterior_variance=post_var,
        posterior_log_variance_clipped=np.log(np.array([post_var[1]] + list(post_var[1:]))),
        posterior_mean_coef1=np.array(
            [betas[i] * math.sqrt(abar_prev[i]) / (1 - abar[i]) for i in range(n)]
        ),
        posterior_mean_coef2=np.array(
            [(1 - abar_prev[i]) * math.sqrt(1 - betas[i]) / (1 - abar[i]) for i in range(n)]
        ),
    )


@pytest.fixture(scope="module")
def sched():
    return diffusion.make_schedule("linear", T)


def batch_of(values, shape=(3, 4, 2)):
    values = np.asarray(values, np.float32)
    return jnp.asarray(np.broadcast_to(values.reshape(-1, *([1] * len(shape))),
                                       (len(values), *shape)).copy())


# ----------------------------------------------------------------------------------------------
# Schedules.
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", diffusion.SCHEDULES)
def test_betas_match_reference(name):
    np.testing.assert_allclose(
        diffusion.get_beta_schedule(name, T), reference_betas(name), rtol=1e-12, atol=1e-15
    )


def test_linear_defaults_are_the_papers():
    betas = diffusion.get_beta_schedule("linear")
    assert betas.shape == (1000,) and betas[0] == 1e-4 and betas[-1] == pytest.approx(0.02)


@pytest.mark.parametrize("name", ["linear", "cosine", "quad", "warmup10"])
def test_tables_match_reference(name):
    sched = diffusion.make_schedule(name, T)
    ref = reference_tables(reference_betas(name))
    for field, expected in ref.items():
        got = np.asarray(getattr(sched, field))
        assert got.dtype == np.float32, field
        np.testing.assert_allclose(got, expected.astype(np.float32), rtol=2e-6, err_msg=field)
    assert sched.num_timesteps == T


def test_jsd_ends_in_pure_noise():
    sched = diffusion.make_schedule("jsd", 10)
    assert float(sched.alphas_cumprod[-1]) == 0.0
    assert float(sched.sqrt_one_minus_alphas_cumprod[-1]) == 1.0


def test_cosine_betas_are_clipped():
    betas = diffusion.get_beta_schedule("cosine", 1000)
    assert betas.max() == pytest.approx(0.999) and betas.min() > 0


def test_schedule_is_a_pytree_through_jit(sched):
    doubled = jax.jit(lambda s: s.betas * 2)(sched)
    np.testing.assert_allclose(doubled, 2 * np.asarray(sched.betas))
    assert len(jax.tree_util.tree_leaves(sched)) == 13


# ----------------------------------------------------------------------------------------------
# The forward process.
# ----------------------------------------------------------------------------------------------
def test_q_sample_moments_over_many_draws(sched):
    n = 200_000
    x0_value = 0.7
    for t_index in (0, 10, 500, 999):
        x0 = jnp.full((n, 1), x0_value)
        t = jnp.full((n,), t_index, jnp.int32)
        noise = jax.random.normal(jax.random.key(t_index), (n, 1))
        x_t = np.asarray(diffusion.q_sample(sched, x0, t, noise), np.float64)
        abar = reference_tables(reference_betas("linear"))["alphas_cumprod"][t_index]
        std_err = math.sqrt((1 - abar) / n)
        assert abs(x_t.mean() - math.sqrt(abar) * x0_value) < 5 * std_err
        assert x_t.var() == pytest.approx(1 - abar, rel=0.02)


def test_q_mean_variance_closed_form(sched):
    x0 = batch_of([0.5, -1.0, 0.25])
    t = jnp.array([0, 300, 999])
    mean, var, log_var = diffusion.q_mean_variance(sched, x0, t)
    abar = reference_tables(reference_betas("linear"))["alphas_cumprod"][[0, 300, 999]]
    np.testing.assert_allclose(mean[:, 0, 0, 0], np.sqrt(abar) * [0.5, -1.0, 0.25], rtol=1e-5)
    np.testing.assert_allclose(var[:, 0, 0, 0], 1 - abar, rtol=1e-5)
    np.testing.assert_allclose(log_var[:, 0, 0, 0], np.log(1 - abar), rtol=1e-5)


@pytest.mark.parametrize("t_index", [1, 2, 50, 999])
def test_posterior_is_bayes_rule(sched, t_index):
    """q(x_{t-1}|x_t,x_0) ∝ q(x_t|x_{t-1}) q(x_{t-1}|x_0), integrated numerically on a grid."""
    betas = reference_betas("linear")
    abar = reference_tables(betas)["alphas_cumprod"]
    x0, x_t = 0.3, -0.4
    prev_mean, prev_var = math.sqrt(abar[t_index - 1]) * x0, 1 - abar[t_index - 1]
    grid = np.linspace(-6, 6, 400_001)
    log_w = (-(x_t - math.sqrt(1 - betas[t_index]) * grid) ** 2 / (2 * betas[t_index])
             - (grid - prev_mean) ** 2 / (2 * prev_var))
    w = np.exp(log_w - log_w.max())
    w /= w.sum()
    bayes_mean = (w * grid).sum()
    bayes_var = (w * (grid - bayes_mean) ** 2).sum()

    mean, var, log_var = diffusion.q_posterior(
        sched, jnp.full((1, 1), x0), jnp.full((1, 1), x_t), jnp.array([t_index])
    )
    assert float(mean[0, 0]) == pytest.approx(bayes_mean, abs=1e-5)
    assert float(var[0, 0]) == pytest.approx(bayes_var, rel=1e-3)
    assert float(log_var[0, 0]) == pytest.approx(math.log(bayes_var), abs=1e-3)


def test_posterior_at_first_step_is_x0(sched):
    """At t = 1 (index 0) x_{t-1} = x_0 exactly: mean x_0, variance 0, log-variance clipped."""
    x0, x_t = batch_of([0.3]), batch_of([-0.9])
    mean, var, log_var = diffusion.q_posterior(sched, x0, x_t, jnp.array([0]))
    np.testing.assert_allclose(mean, x0, atol=1e-6)
    assert float(var.max()) == 0.0
    post_var = reference_tables(reference_betas("linear"))["posterior_variance"]
    assert float(log_var.max()) == pytest.approx(math.log(post_var[1]), rel=1e-5)


def test_conversions_invert_each_other(sched):
    key_x, key_e = jax.random.split(jax.random.key(0))
    x0 = jax.random.uniform(key_x, (4, 8, 8, 3), minval=-1, maxval=1)
    eps = jax.random.normal(key_e, x0.shape)
    t = jnp.array([0, 1, 500, 998])
    x_t = diffusion.q_sample(sched, x0, t, eps)
    np.testing.assert_allclose(diffusion.predict_x0_from_eps(sched, x_t, t, eps), x0, atol=2e-4)
    np.testing.assert_allclose(diffusion.predict_eps_from_x0(sched, x_t, t, x0), eps, atol=2e-3)
    v = diffusion.predict_v(sched, x0, t, eps)
    np.testing.assert_allclose(diffusion.predict_x0_from_v(sched, x_t, t, v), x0, atol=1e-5)
    np.testing.assert_allclose(diffusion.predict_eps_from_v(sched, x_t, t, v), eps, atol=1e-5)
    # v from its definition in float64.
    abar = reference_tables(reference_betas("linear"))["alphas_cumprod"][[0, 1, 500, 998]]
    v_ref = (np.sqrt(abar)[:, None, None, None] * np.asarray(eps, np.float64)
             - np.sqrt(1 - abar)[:, None, None, None] * np.asarray(x0, np.float64))
    np.testing.assert_allclose(v, v_ref, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# The reverse process.
# ----------------------------------------------------------------------------------------------
def test_eps_mean_is_equation_11(sched):
    betas = reference_betas("linear")
    abar = reference_tables(betas)["alphas_cumprod"]
    t_idx = np.array([1, 20, 700, 999])
    x_t = np.linspace(-2, 2, 4 * 6).reshape(4, 2, 3, 1)
    eps = np.cos(np.arange(4 * 6)).reshape(4, 2, 3, 1)
    mean, var, _, _ = diffusion.p_mean_variance(
        sched, jnp.asarray(eps, jnp.float32), jnp.asarray(x_t, jnp.float32), jnp.asarray(t_idx),
        clip_denoised=False,
    )
    b = betas[t_idx][:, None, None, None]
    a_bar = abar[t_idx][:, None, None, None]
    expected = (x_t - b / np.sqrt(1 - a_bar) * eps) / np.sqrt(1 - b)
    np.testing.assert_allclose(mean, expected, rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(var[:, 0, 0, 0], betas[t_idx], rtol=1e-6)


def test_model_variances(sched):
    betas = reference_betas("linear")
    post_var = reference_tables(betas)["posterior_variance"]
    t = jnp.array([0, 1, 999])
    large, log_large = diffusion.model_variance(sched, t, (3, 1), "fixedlarge")
    np.testing.assert_allclose(large[:, 0], [post_var[1], betas[1], betas[999]], rtol=1e-6)
    np.testing.assert_allclose(log_large, np.log(large), rtol=1e-6)
    small, log_small = diffusion.model_variance(sched, t, (3, 1), "fixedsmall")
    np.testing.assert_allclose(small[:, 0], post_var[[0, 1, 999]], rtol=1e-6)
    np.testing.assert_allclose(log_small[:, 0], np.log(post_var[[1, 1, 999]]), rtol=1e-6)


def test_model_variances_of_a_one_step_schedule():
    """A one-step schedule has no β̃_2: fixedlarge keeps σ² = β_1 (finite log), fixedsmall β̃_1."""
    beta = 0.3
    sched = diffusion.schedule_from_betas(np.array([beta]))
    t = jnp.array([0])
    large, log_large = diffusion.model_variance(sched, t, (1, 1), "fixedlarge")
    np.testing.assert_allclose(large[:, 0], [beta], rtol=1e-6)
    np.testing.assert_allclose(log_large[:, 0], [math.log(beta)], rtol=1e-6)
    small, _ = diffusion.model_variance(sched, t, (1, 1), "fixedsmall")
    np.testing.assert_allclose(small[:, 0], [0.0])


def test_clipping_and_parameterisations_agree(sched):
    x0 = jnp.full((2, 3, 3, 1), 0.5)
    eps = jax.random.normal(jax.random.key(1), x0.shape)
    t = jnp.array([100, 900])
    x_t = diffusion.q_sample(sched, x0, t, eps)
    outputs = {"eps": eps, "x0": x0, "v": diffusion.predict_v(sched, x0, t, eps)}
    means = [diffusion.p_mean_variance(sched, out, x_t, t, mean_type=k)[0]
             for k, out in outputs.items()]
    for mean in means[1:]:
        np.testing.assert_allclose(mean, means[0], atol=1e-4)
    _, _, _, pred = diffusion.p_mean_variance(sched, jnp.full_like(x0, 5.0), x_t, t,
                                              mean_type="x0")
    assert float(pred.max()) == 1.0


# ----------------------------------------------------------------------------------------------
# Losses and the bound.
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mean_type", ["eps", "x0", "v"])
def test_true_target_gives_zero_loss(sched, mean_type):
    x0 = jax.random.uniform(jax.random.key(2), (4, 8, 8, 3), minval=-1, maxval=1)
    noise = jax.random.normal(jax.random.key(3), x0.shape)
    t = jnp.array([0, 10, 500, 999])

    def oracle(x_t, t_):
        if mean_type == "eps":
            return noise
        if mean_type == "x0":
            return x0
        return diffusion.predict_v(sched, x0, t_, noise)

    loss = diffusion.training_losses(sched, oracle, x0, t, noise, mean_type=mean_type)
    assert loss.shape == (4,) and loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, 0.0, atol=1e-10)
    zero = diffusion.training_losses(sched, lambda x, t_: jnp.zeros_like(x), x0, t, noise)
    np.testing.assert_allclose(zero, np.mean(np.asarray(noise) ** 2, axis=(1, 2, 3)), rtol=1e-5)


def test_normal_kl_against_numerical_integral():
    m1, lv1, m2, lv2 = 0.3, math.log(0.5), -0.2, math.log(1.7)
    x = np.linspace(-15, 15, 600_001)
    p = np.exp(-(x - m1) ** 2 / (2 * math.exp(lv1))) / math.sqrt(2 * math.pi * math.exp(lv1))
    log_q = -(x - m2) ** 2 / (2 * math.exp(lv2)) - 0.5 * math.log(2 * math.pi * math.exp(lv2))
    log_p = np.log(np.maximum(p, 1e-300))
    kl_numeric = np.trapezoid(p * (log_p - log_q), x)
    assert float(diffusion.normal_kl(m1, lv1, m2, lv2)) == pytest.approx(kl_numeric, rel=1e-5)
    assert float(diffusion.normal_kl(m1, lv1, m1, lv1)) == 0.0


def test_discretized_decoder_is_a_distribution_over_256_levels():
    levels = jnp.asarray(np.arange(256) / 127.5 - 1.0, jnp.float32)
    for mean, log_scale in [(0.1, -3.0), (-0.97, -4.0), (0.5, 0.0)]:
        log_p = diffusion.discretized_gaussian_log_likelihood(
            levels, means=jnp.float32(mean), log_scales=jnp.float32(log_scale)
        )
        assert float(jnp.exp(log_p).sum()) == pytest.approx(1.0, abs=1e-5)
        # Against the exact normal CDF (the tanh approximation is good to ~1e-3).
        std = math.exp(log_scale)
        cdf = [0.5 * (1 + math.erf((v - mean) / (std * math.sqrt(2))))
               for v in np.arange(257) / 127.5 - 1.0 - 1 / 255]
        exact = np.diff([0.0] + cdf[1:-1] + [1.0])
        np.testing.assert_allclose(np.exp(log_p), exact, atol=2e-3)


def oracle_eps_fn(sched, x0_value):
    """The exact ε given x_t when every image equals ``x0_value``."""
    def fn(x_t, t):
        shape = x_t.shape
        return ((x_t - diffusion.extract(sched.sqrt_alphas_cumprod, t, shape) * x0_value)
                / diffusion.extract(sched.sqrt_one_minus_alphas_cumprod, t, shape))
    return fn


def test_bits_per_dim_closed_form_for_an_oracle():
    """With the exact ε and σ_t² = β̃_t every KL term is 0; what remains is the decoder and prior."""
    sched = diffusion.make_schedule("linear", 100, beta_end=0.2)
    x0 = batch_of(np.array([0, 127, 1, 255]) / 127.5 - 1.0, shape=(2, 2, 1))
    out = jax.jit(lambda x: diffusion.bits_per_dim(
        sched, oracle_eps_fn(sched, x), x, jax.random.key(0), var_type="fixedsmall",
        clip_denoised=False, timesteps_per_chunk=10))(x0)
    np.testing.assert_allclose(out["terms_bpd"][:, 1:], 0.0, atol=1e-4)

    tables = reference_tables(reference_betas("linear", 100, beta_end=0.2))
    std = math.sqrt(tables["posterior_variance"][1])
    abar_T = tables["alphas_cumprod"][-1]
    for i, v in enumerate(np.asarray(x0[:, 0, 0, 0], np.float64)):
        def cdf(z):
            return 0.5 * (1 + math.erf(z / (std * math.sqrt(2))))
        lo = 0.0 if v < -0.999 else cdf(-1 / 255)
        hi = 1.0 if v > 0.999 else cdf(1 / 255)
        decoder_bits = -math.log2(hi - lo)
        assert float(out["terms_bpd"][i, 0]) == pytest.approx(decoder_bits, rel=2e-3)
        prior_nats = 0.5 * (-1 - math.log(1 - abar_T) + (1 - abar_T) + abar_T * v * v)
        prior_bits = prior_nats / math.log(2)
        assert float(out["prior_bpd"][i]) == pytest.approx(prior_bits, rel=1e-3, abs=1e-6)
    np.testing.assert_allclose(out["total_bpd"], out["terms_bpd"].sum(1) + out["prior_bpd"],
                               rtol=1e-6)
    np.testing.assert_allclose(out["x0_mse"], 0.0, atol=1e-8)


def test_bits_per_dim_prefers_the_perfect_model():
    sched = diffusion.make_schedule("linear", 50, beta_end=0.3)
    x0 = jnp.full((2, 4, 4, 1), 64 / 127.5 - 1)
    rng = jax.random.key(5)
    perfect = diffusion.bits_per_dim(sched, oracle_eps_fn(sched, x0), x0, rng)
    bad = diffusion.bits_per_dim(sched, lambda x, t: jnp.zeros_like(x), x0, rng)
    chunked = diffusion.bits_per_dim(sched, oracle_eps_fn(sched, x0), x0, rng,
                                     timesteps_per_chunk=25)
    assert np.all(perfect["total_bpd"] < bad["total_bpd"])
    np.testing.assert_allclose(chunked["total_bpd"], perfect["total_bpd"], rtol=1e-5)
    assert perfect["terms_bpd"].shape == (2, 50)


# ----------------------------------------------------------------------------------------------
# Transformations and dtypes.
# ----------------------------------------------------------------------------------------------
def test_jit_vmap_and_bf16(sched):
    x0 = jax.random.uniform(jax.random.key(0), (2, 4, 4, 3), minval=-1, maxval=1)
    noise = jax.random.normal(jax.random.key(1), x0.shape)
    t = jnp.array([3, 600])
    eager = diffusion.q_sample(sched, x0, t, noise)
    np.testing.assert_allclose(jax.jit(diffusion.q_sample)(sched, x0, t, noise), eager, atol=1e-6)
    per_example = jax.vmap(lambda a, b, c: diffusion.q_sample(sched, a[None], b[None], c[None])[0])
    np.testing.assert_allclose(per_example(x0, t, noise), eager, atol=1e-6)

    x_bf16 = diffusion.q_sample(sched, x0.astype(jnp.bfloat16), t, noise.astype(jnp.bfloat16))
    assert x_bf16.dtype == jnp.bfloat16
    np.testing.assert_allclose(x_bf16.astype(jnp.float32), eager, atol=3e-2)
    loss = diffusion.training_losses(sched, lambda x, t_: x * 0.5, x0.astype(jnp.bfloat16), t,
                                     noise.astype(jnp.bfloat16))
    assert loss.dtype == jnp.float32
    mean, var, log_var, _ = diffusion.p_mean_variance(
        sched, noise.astype(jnp.bfloat16), x_bf16, t)
    assert mean.dtype == var.dtype == log_var.dtype == jnp.float32


# ----------------------------------------------------------------------------------------------
# Bad input.
# ----------------------------------------------------------------------------------------------
def test_bad_inputs_raise_clear_errors(sched):
    with pytest.raises(ValueError, match="Unknown beta schedule 'lin'.*linear"):
        diffusion.make_schedule("lin")
    with pytest.raises(ValueError, match="positive integer"):
        diffusion.make_schedule("linear", 0)
    with pytest.raises(ValueError, match="positive integer"):
        diffusion.make_schedule("linear", -5)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        diffusion.make_schedule("linear", 10, beta_start=0.0)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        diffusion.make_schedule("linear", 10, beta_end=1.5)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        diffusion.schedule_from_betas(np.array([0.1, np.nan]))
    with pytest.raises(ValueError, match="takes no options"):
        diffusion.make_schedule("linear", 10, s=0.1)
    x = jnp.zeros((2, 4, 4, 1))
    with pytest.raises(ValueError, match="batch sizes differ"):
        diffusion.q_sample(sched, x, jnp.array([1, 2, 3]), x)
    with pytest.raises(ValueError, match="integer array"):
        diffusion.q_sample(sched, x, jnp.array([1.0, 2.0]), x)
    with pytest.raises(ValueError, match="Unknown mean_type 'epsilon'"):
        diffusion.p_mean_variance(sched, x, x, jnp.array([1, 2]), mean_type="epsilon")
    with pytest.raises(ValueError, match="Unknown var_type 'learned'"):
        diffusion.p_mean_variance(sched, x, x, jnp.array([1, 2]), var_type="learned")
    with pytest.raises(ValueError, match="must be positive and divide"):
        diffusion.bits_per_dim(sched, lambda a, b: a, x, jax.random.key(0), timesteps_per_chunk=7)


def test_schedule_from_config():
    import ml_collections

    config = ml_collections.ConfigDict(
        {"schedule": "quad", "num_timesteps": 20, "beta_start": 1e-3, "beta_end": 0.05}
    )
    np.testing.assert_allclose(
        diffusion.schedule_from_config(config).betas,
        reference_betas("quad", 20, beta_start=1e-3, beta_end=0.05).astype(np.float32),
        rtol=1e-6,
    )
