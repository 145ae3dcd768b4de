"""Classifier-free guidance (``sampling.make_model_fn(..., guidance=w)``) against closed forms.

Data: x_0 | y ~ N(μ_y, S²) per pixel, with class means that are draws from N(MU, TAU²), so that
x_0 | ∅ ~ N(MU, S² + TAU²). Both optimal ε-predictors are affine in x_t, hence so is the guided
ε̃ = (1+w) ε(x_t, y) - w ε(x_t, ∅), and every sampler driven by it is an affine map plus Gaussian
noise: its output moments follow from a float64 propagation of the guided update written here.
The analytic network answers in the ε, x_0 or v parameterisation; guidance combines its outputs.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import diffusion, sampling
from ddpm_jax.models import UNet

T = 1000
S, MU, TAU = 0.2, 0.1, 0.5
CLASS_MEANS = (-0.4, 0.6)  # classes 0 and 1; label 2 is ∅
BETAS = np.array([1e-4 + (0.02 - 1e-4) * i / (T - 1) for i in range(T)])
ALPHA_BAR = np.cumprod(1.0 - BETAS)
PER_CLASS = 1024
SHAPE = (2 * PER_CLASS, 8, 8, 1)  # the first half class 0, the second class 1
LABELS = jnp.repeat(jnp.arange(2, dtype=jnp.int32), PER_CLASS)


class AnalyticModel:
    """The optimal network of the data above, with UNet's ``apply`` signature; label 2 = ∅.
    ``batches`` records the batch size of every traced call."""

    num_classes, null_class = 2, True

    def __init__(self, mean_type: str) -> None:
        self.mean_type, self.batches = mean_type, []

    def apply(self, variables, x, t, y, train):
        del variables, train
        self.batches.append(x.shape[0])
        mean = jnp.asarray([*CLASS_MEANS, MU], jnp.float32)[y].reshape(-1, 1, 1, 1)
        var = jnp.asarray([S**2, S**2, S**2 + TAU**2], jnp.float32)[y].reshape(-1, 1, 1, 1)
        a = jnp.asarray(ALPHA_BAR, jnp.float32)[t].reshape(-1, 1, 1, 1)
        eps = jnp.sqrt(1 - a) * (x - jnp.sqrt(a) * mean) / (a * var + 1 - a)
        x0 = (x - jnp.sqrt(1 - a) * eps) / jnp.sqrt(a)
        return {"eps": eps, "x0": x0, "v": jnp.sqrt(a) * eps - jnp.sqrt(1 - a) * x0}[
            self.mean_type]


def affine_eps(a, mean, var):
    """(A, B) of the optimal ε = A x + B at ᾱ = a for x_0 ~ N(mean, var)."""
    A = math.sqrt(1 - a) / (a * var + 1 - a)
    return A, -A * math.sqrt(a) * mean


def exact_moments(timesteps, sampler, guidance, class_mean, *, var_type="fixedsmall", eta=0.0,
                  interval=None):
    """Output mean and variance of the guided chain from x_T ~ N(0, 1), in float64: each step is
    x' = c x + d + σ z with ε̃ = A x + B, A = (1+w) A_y - w A_∅ (B likewise); w = ``guidance`` at
    the steps whose timestep lies in ``interval`` (t_min, t_max) (all steps if None), else 0."""
    abar, mean, var = ALPHA_BAR[timesteps], 0.0, 1.0
    for i in reversed(range(len(timesteps))):
        lo, hi = interval or (0, T - 1)
        w = guidance if lo <= timesteps[i] <= hi else 0.0
        a, a_prev = abar[i], (abar[i - 1] if i > 0 else 1.0)
        (Ay, By), (Au, Bu) = affine_eps(a, class_mean, S**2), affine_eps(a, MU, S**2 + TAU**2)
        A, B = (1 + w) * Ay - w * Au, (1 + w) * By - w * Bu
        if sampler == "ddpm":  # Ho et al. eq. 11 on the respaced chain
            beta = 1 - a / a_prev
            k = beta / math.sqrt(1 - a)
            c, d = (1 - k * A) / math.sqrt(1 - beta), -k * B / math.sqrt(1 - beta)
            sigma2 = beta if var_type == "fixedlarge" else beta * (1 - a_prev) / (1 - a)
        else:  # Song et al. eqs. 12 and 16
            sigma2 = eta**2 * (1 - a_prev) / (1 - a) * (1 - a / a_prev)
            x0_c = (1 - math.sqrt(1 - a) * A) / math.sqrt(a)
            x0_d = -math.sqrt(1 - a) * B / math.sqrt(a)
            r = math.sqrt(max(1 - a_prev - sigma2, 0.0))
            c, d = math.sqrt(a_prev) * x0_c + r * A, math.sqrt(a_prev) * x0_d + r * B
        mean, var = c * mean + d, c * c * var + (sigma2 if i > 0 else 0.0)
    return mean, var


def assert_moments(x, mean, var, num_se=5.0):
    x = np.asarray(x, np.float64).ravel()
    n = x.size
    np.testing.assert_allclose(x.mean(), mean, atol=num_se * math.sqrt(var / n))
    np.testing.assert_allclose(x.var(), var, atol=num_se * var * math.sqrt(2.0 / (n - 1)))


@pytest.fixture(scope="module")
def sched():
    return diffusion.make_schedule("linear", T)


CASES = [  # (sampler, num_steps, kwargs, mean_type, w)
    ("ddpm", 25, dict(var_type="fixedsmall"), "eps", 0.0),
    ("ddpm", 25, dict(var_type="fixedsmall"), "eps", 2.0),
    ("ddpm", 10, dict(var_type="fixedlarge"), "x0", 1.0),
    ("ddpm", 25, dict(var_type="fixedsmall"), "v", 4.0),
    ("ddim", 10, dict(eta=0.0), "v", 0.5),
    ("ddim", 20, dict(eta=1.0), "eps", 2.0),
]


@pytest.mark.parametrize("sampler, num_steps, kw, mean_type, w", CASES)
def test_guided_sampler_moments_match_the_float64_propagation(sched, sampler, num_steps, kw,
                                                              mean_type, w):
    model = AnalyticModel(mean_type)
    model_fn = sampling.make_model_fn(model, None, LABELS, guidance=w)
    x = jax.jit(lambda rng: sampling.sample(
        model_fn, sched, rng, SHAPE, sampler=sampler, num_steps=num_steps, mean_type=mean_type,
        clip_denoised=False, **kw))(jax.random.key(0))
    timesteps = sampling.space_timesteps(T, num_steps)
    for k, class_mean in enumerate(CLASS_MEANS):
        mean, var = exact_moments(timesteps, sampler, w, class_mean, **kw)
        assert_moments(x[k * PER_CLASS:(k + 1) * PER_CLASS], mean, var)
    # One network call per step, in the scan: the conditional and ∅ halves batched together.
    assert model.batches == [SHAPE[0] * (2 if w else 1)]


INTERVAL_CASES = [  # (sampler, num_steps, kwargs, mean_type, w, interval)
    ("ddpm", 25, dict(var_type="fixedsmall"), "eps", 2.0, (400, 999)),
    ("ddpm", 25, dict(var_type="fixedsmall"), "v", 3.0, (200, 600)),
    ("ddim", 10, dict(eta=0.0), "x0", 1.0, (0, 300)),
]


@pytest.mark.parametrize("sampler, num_steps, kw, mean_type, w, interval", INTERVAL_CASES)
def test_guidance_interval_matches_the_float64_propagation_and_skips_the_unguided_half(
    sched, sampler, num_steps, kw, mean_type, w, interval
):
    """Guidance only at the steps whose t is in the interval (Kynkäänniemi et al. 2024); the
    other steps run the network once, on the conditional half alone (counted as it runs)."""
    model = AnalyticModel(mean_type)
    executed = []
    apply = model.apply

    def counting_apply(variables, x, t, y, train):
        jax.debug.callback(lambda n=x.shape[0]: executed.append(n))
        return apply(variables, x, t, y, train)

    model.apply = counting_apply
    model_fn = sampling.make_model_fn(model, None, LABELS, guidance=w, guidance_interval=interval)
    x = jax.jit(lambda rng: sampling.sample(
        model_fn, sched, rng, SHAPE, sampler=sampler, num_steps=num_steps, mean_type=mean_type,
        clip_denoised=False, **kw))(jax.random.key(1))
    jax.effects_barrier()
    timesteps = sampling.space_timesteps(T, num_steps)
    for k, class_mean in enumerate(CLASS_MEANS):
        mean, var = exact_moments(timesteps, sampler, w, class_mean, interval=interval, **kw)
        assert_moments(x[k * PER_CLASS:(k + 1) * PER_CLASS], mean, var)
    # The interval must move the mean by more than twice assert_moments' tolerance, else this
    # test could not tell it from full guidance.
    full, _ = exact_moments(timesteps, sampler, w, CLASS_MEANS[1], **kw)
    part, var = exact_moments(timesteps, sampler, w, CLASS_MEANS[1], interval=interval, **kw)
    assert abs(full - part) > 2 * 5.0 * math.sqrt(var / (PER_CLASS * 64))
    guided_steps = int(np.sum((timesteps >= interval[0]) & (timesteps <= interval[1])))
    assert 0 < guided_steps < num_steps
    assert sorted(executed) == sorted(
        [SHAPE[0]] * (num_steps - guided_steps) + [2 * SHAPE[0]] * guided_steps)


def test_guidance_interval_spanning_every_step_is_full_guidance(sched):
    model = AnalyticModel("eps")
    draw = lambda fn: sampling.sample(fn, sched, jax.random.key(2), SHAPE, num_steps=10)  # noqa: E731
    full = sampling.make_model_fn(model, None, LABELS, guidance=2.0)
    spanning = sampling.make_model_fn(model, None, LABELS, guidance=2.0,
                                      guidance_interval=(0, T - 1))
    np.testing.assert_allclose(np.asarray(draw(spanning)), np.asarray(draw(full)), atol=1e-6)


@pytest.mark.parametrize("interval", [(500, 400), (-1, 10), (0, T), (0.5, 10), (3,), "0,999"])
def test_bad_guidance_interval_is_a_clear_error(interval):
    with pytest.raises(ValueError, match="guidance_interval"):
        sampling.check_guidance_interval(interval, num_timesteps=T)


def test_guidance_moves_samples_beyond_the_class_mean():
    """The closed form itself: with w > 0 the mean overshoots μ_y away from the ∅ mean MU."""
    steps = sampling.space_timesteps(T, 25)
    m0, _ = exact_moments(steps, "ddpm", 0.0, CLASS_MEANS[1])
    m2, _ = exact_moments(steps, "ddpm", 2.0, CLASS_MEANS[1])
    assert abs(m0 - CLASS_MEANS[1]) < 0.01 and m2 > CLASS_MEANS[1] + 0.05


def test_w0_reproduces_the_unguided_sampler_exactly(sched):
    model = AnalyticModel("v")
    plain = sampling.make_model_fn(model, None, LABELS)
    guided = sampling.make_model_fn(model, None, LABELS, guidance=0.0)
    draw = lambda fn: sampling.sample(fn, sched, jax.random.key(3), SHAPE, num_steps=10,  # noqa: E731
                                      mean_type="v")
    np.testing.assert_array_equal(np.asarray(draw(guided)), np.asarray(draw(plain)))


def test_guidance_needs_a_model_trained_with_label_dropout():
    kw = dict(ch=32, out_ch=1, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), dropout=0.0)
    y = jnp.zeros((2,), jnp.int32)
    with pytest.raises(ValueError, match="label dropout"):
        sampling.make_model_fn(UNet(num_classes=3, **kw), {}, y, guidance=1.0)
    with pytest.raises(ValueError, match=">= 0"):
        sampling.make_model_fn(UNet(num_classes=3, null_class=True, **kw), {}, y, guidance=-1.0)
    with pytest.raises(ValueError, match="needs a class-conditional model"):
        UNet(null_class=True, **kw)
    sampling.make_model_fn(UNet(num_classes=3, null_class=True, **kw), {}, y, guidance=1.0)
