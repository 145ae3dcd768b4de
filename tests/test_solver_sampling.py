"""DPM-Solver++ (``dpm++``, ``dpm++sde``) through ``sampling.sample`` and the programs: the one
``lax.scan`` equals a plain loop over ``dpm_solver.step`` (guided too, with trajectories), compiles
once, and bad settings are one error from the spec in the sample and evaluate programs and the
trainer, before anything is written. The solver's math itself: tests/test_dpm_solver.py."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_dpm_solver import ABAR, run_chain
from test_guidance import AnalyticModel
from test_sample_cli import REPO, random_params, run_main, tiny_config

from ddpm_jax import checkpointing, diffusion, dpm_solver, generation, sampler_spec, sampling
from ddpm_jax.sampler_spec import SamplerSpec

T = 1000
SHAPE = (4, 3, 3, 2)


@pytest.fixture(scope="module")
def sched():
    return diffusion.make_schedule("linear", T)


def toy_model_fn(x, t):
    """test_dpm_solver's toy network (an ε whose x̂_0 is bounded in (x_t, t)), traceable."""
    a = jnp.asarray(ABAR, jnp.float32)[t].reshape(-1, 1, 1, 1)
    s = (t / T).reshape(-1, 1, 1, 1)
    x0 = 0.8 * jnp.tanh(1.3 * x - s) + 0.1 * jnp.sin(3.0 * x + 5.0 * s)
    return (x - jnp.sqrt(a) * x0) / jnp.sqrt(1.0 - a)


def reference(sched, model_fn, rng, shape, *, sampler, num_steps, order, spacing, clip_denoised,
              mean_type="eps"):
    """``run_chain``'s loop from sample()'s x_T (split(rng)[0]) with, for the SDE, the noise of
    chain index n-1-j from fold_in(split(rng)[1], n-1-j) at step j: every x [N+1]."""
    tables = dpm_solver.make_tables(sched, num_steps, order=order, spacing=spacing,
                                    sde=sampler == "dpm++sde")
    rng_init, rng_steps = jax.random.split(rng)
    noises = None
    if tables.sde:
        noises = [jax.random.normal(jax.random.fold_in(rng_steps, num_steps - 1 - j), shape)
                  for j in range(num_steps)]
    x_T = jax.random.normal(rng_init, shape)
    return tables, run_chain(sched, tables, model_fn, x_T, mean_type=mean_type,
                             clip_denoised=clip_denoised, noises=noises)


@pytest.mark.parametrize("sampler, order, spacing, num_steps", [
    ("dpm++", 2, "time", 6),
    ("dpm++", 2, "logsnr", 6),
    ("dpm++", 3, "time", 7),
    ("dpm++", 3, "logsnr", 16),  # at or above 15 steps: no lowered final orders
    ("dpm++sde", 2, "time", 6),
    ("dpm++sde", 1, "logsnr", 4),
])
def test_sample_equals_the_solver_loop(sched, sampler, order, spacing, num_steps):
    rng = jax.random.key(3)
    for clip_denoised in (False, True):
        tables, xs = reference(sched, toy_model_fn, rng, SHAPE, sampler=sampler,
                               num_steps=num_steps, order=order, spacing=spacing,
                               clip_denoised=clip_denoised)
        assert tables.orders.max() == order
        ours = sampling.sample(toy_model_fn, sched, rng, SHAPE, sampler=sampler,
                               num_steps=num_steps, order=order, spacing=spacing,
                               clip_denoised=clip_denoised, var_type="fixedsmall")
        np.testing.assert_allclose(ours, xs[-1], rtol=1e-5, atol=5e-5)


@pytest.mark.parametrize("sampler", ["dpm++", "dpm++sde"])
def test_guided_chain_and_trajectory_equal_the_loop(sched, sampler):
    """Classifier-free guidance limited to t in 300..999 (the last steps unguided) comes in
    through model_fn; the trajectory holds every 2nd step's input, x̂_0 and timestep."""
    model = AnalyticModel("v")
    labels = jnp.array([0, 1, 1, 0], jnp.int32)
    model_fn = sampling.make_model_fn(model, {}, labels, guidance=1.5, guidance_interval=(300, 999))
    rng, num_steps = jax.random.key(1), 8
    tables, xs = reference(sched, model_fn, rng, SHAPE, sampler=sampler, num_steps=num_steps,
                           order=2, spacing="logsnr", clip_denoised=True, mean_type="v")
    assert tables.timesteps.min() < 300 < tables.timesteps.max()
    ours, trajectory = sampling.sample(
        model_fn, sched, rng, SHAPE, sampler=sampler, num_steps=num_steps, spacing="logsnr",
        mean_type="v", return_trajectory=True, trajectory_every=2)
    np.testing.assert_allclose(ours, xs[-1], rtol=1e-5, atol=5e-5)
    np.testing.assert_allclose(trajectory.x_t, xs[:-1:2], rtol=1e-5, atol=5e-5)
    np.testing.assert_array_equal(trajectory.timesteps, tables.timesteps[::2])
    # The last step lands on σ = 0: the sample is the (clipped) x̂_0 of the last model call.
    respaced = sampling.respace(sched, tables.timesteps[::-1])
    x_last = jnp.asarray(xs[-2], jnp.float32)
    t_last = jnp.full((SHAPE[0],), tables.timesteps[-1], jnp.int32)
    x0 = jnp.clip(diffusion.predict_x0(respaced, model_fn(x_last, t_last), x_last,
                                       jnp.zeros_like(t_last), "v"), -1, 1)
    np.testing.assert_allclose(ours, x0, rtol=1e-5, atol=5e-5)
    assert set(model.batches) == {2 * SHAPE[0], SHAPE[0]}  # guided and unguided calls


@pytest.mark.parametrize("sampler, options", [
    ("dpm++", dict(order=3, spacing="time")), ("dpm++sde", dict(order=2, spacing="logsnr"))])
def test_one_compile_per_setting(sched, sampler, options):
    traces = []

    def model_fn(x, t):
        traces.append(1)
        return 0.1 * x

    fn = jax.jit(lambda rng: sampling.sample(model_fn, sched, rng, (2, 4, 4, 1), sampler=sampler,
                                             num_steps=30, **options))
    fn(jax.random.key(0)).block_until_ready()
    fn(jax.random.key(1)).block_until_ready()
    assert len(traces) == 1  # one trace of the scan body for 30 steps and two calls


# ----------------------------------------------------------------------------------------------
# The declaration: spec, names, errors.
# ----------------------------------------------------------------------------------------------
def test_the_spec_names_and_records_the_solver():
    spec = SamplerSpec(T, sampler="dpm++", num_steps=20, options={"order": 3})
    assert spec.options == (("order", 3), ("spacing", "time"))
    assert (spec.name(), spec.tag(), spec.describe()) == (
        "dpm++_20_order3_spacingtime", "dpm++20_order3_spacingtime",
        "dpm++ 20 steps, order 3, spacing time")
    assert SamplerSpec.from_json(spec.to_json(), T) == spec
    assert spec.chain_kwargs() == dict(sampler="dpm++", num_steps=20, var_type="fixedlarge",
                                       clip_denoised=True, order=3, spacing="time")
    assert spec.summary()["order"] == 3
    ddpm = SamplerSpec(T, sampler="ddpm", num_steps=50)  # records the solver's options not
    assert not {"order", "spacing"} & (set(ddpm.to_json()) | set(ddpm.summary()))


BAD = [  # (fields of the spec, the error)
    (dict(sampler="dpm++", num_steps=20, order=4), r"order=4 is invalid for sampler 'dpm\+\+': "
     "order must be 1, 2 or 3"),
    (dict(sampler="dpm++", num_steps=4, order=3), r"num_steps=4 is invalid for DPM-Solver\+\+ of "
     r"order 3 .*\[5, 999\] \(order 3 needs at least 5 steps"),
    (dict(sampler="ddpm", num_steps=20, order=3), r"order=3 is invalid for sampler 'ddpm', which "
     r"takes no options: order is only used by the 'dpm\+\+' and 'dpm\+\+sde' samplers"),
    (dict(sampler="ddim", num_steps=20, spacing="logsnr"), "spacing='logsnr' is invalid for "
     "sampler 'ddim'"),
    (dict(sampler="dpm++sde", num_steps=20, order=3), r"order=3 is invalid for DPM-Solver\+\+ "
     "SDE: choose one of 1, 2"),
    (dict(sampler="dpm++", num_steps=20, spacing="karras"), "spacing='karras' is invalid for "
     r"sampler 'dpm\+\+': spacing must be time or logsnr"),
    (dict(sampler="dpm++", num_steps=None), r"num_steps=1000 is invalid for DPM-Solver\+\+ of "
     r"order 2 .*at most 999 distinct timesteps"),
    (dict(sampler="dpm++", num_steps=50, spacing="logsnr"), "num_steps=50 with logsnr spacing "
     "repeats timesteps on this 1000-step schedule .*use at most 38 steps"),
]


@pytest.mark.parametrize("fields, error", BAD)
def test_bad_settings_are_one_error_from_the_spec(fields, error):
    """From a config's sample section (as the trainer's grid) and from its eval section over
    it; the log-SNR repeat needs the schedule, so it is found against the model's config."""
    config = tiny_config()
    for name in sampling.OPTIONS:
        config.sample[name] = None
    with pytest.raises(ValueError, match=error):
        sampler_spec.from_config(config, fields)
    config.eval = dict(fields)
    with pytest.raises(ValueError, match=error):
        sampler_spec.from_config(config, config.eval)
    with pytest.raises(ValueError, match=error):
        sampling.make_chain(diffusion.schedule_from_config(config.diffusion), **fields)


def test_the_eval_section_takes_solver_fields():
    config = tiny_config()
    sampler_spec.add_option_fields(config.sample, inherit=False)
    config.eval = dict(sampler="dpm++", num_steps=10, order=None, spacing="logsnr", eta=None)
    spec = sampler_spec.from_config(config, config.eval)
    assert (spec.sampler, spec.steps, spec.options) == (
        "dpm++", 10, (("order", 2), ("spacing", "logsnr")))


def test_trainer_refuses_a_bad_solver_setting_before_writing(tmp_path):
    from test_train import tiny_config as train_config

    from ddpm_jax import training

    config = train_config()
    config.sample.sampler, config.sample.num_steps, config.sample.order = "dpm++", 4, 3
    with pytest.raises(ValueError, match="order 3 needs at least 5 steps"):
        training.train_and_evaluate(config, tmp_path)
    assert not any(tmp_path.iterdir())


# ----------------------------------------------------------------------------------------------
# The programs, on a tiny UNet checkpoint.
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    config = tiny_config()
    path = tmp_path_factory.mktemp("run")
    checkpointing.save_params_checkpoint(path, random_params(config), config, step=5)
    return path


def test_sample_program_runs_the_solver(workdir):
    run_main(f"--workdir={workdir}", "--num_samples=4", "--batch_size=4", "--sampler=dpm++",
             "--order=3", "--steps=5", "--spacing=logsnr")
    out = workdir / "samples_dpm++_5_order3_spacinglogsnr"
    settings = json.loads((out / generation.SETTINGS_FILE).read_text())
    assert (settings["sampler"], settings["order"], settings["spacing"]) == ("dpm++", 3, "logsnr")
    with np.load(out / "samples.npz") as f:
        assert f["arr_0"].shape == (4, 8, 8, 1)
    # The same images as sampling.sample's chain on the checkpoint's EMA params.
    params, config, _ = checkpointing.load_ema_params(workdir)
    spec = SamplerSpec.from_json(settings, T)
    again = generation.generate_samples(params, config, out.parent / "again", spec,
                                        num_samples=4, batch_size=4, seed=0, checkpoint_step=5)
    with np.load(out / "samples.npz") as a, np.load(again) as b:
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])


@pytest.mark.parametrize("args, error", [
    (["--sampler=dpm++", "--order=4", "--steps=20"], "order=4 is invalid"),
    (["--sampler=dpm++", "--order=3", "--steps=4"], "order 3 needs at least 5 steps"),
    (["--sampler=ddpm", "--order=3", "--steps=20"], "order=3 is invalid for sampler 'ddpm'"),
    (["--sampler=dpm++", "--spacing=logsnr", "--steps=50"], "use at most 38 steps"),
    (["--sampler=dpm++sde", "--order=3", "--steps=20"], "choose one of 1, 2"),
])
def test_sample_program_errors(workdir, tmp_path, args, error):
    with pytest.raises(ValueError, match=error):
        run_main(f"--workdir={workdir}", f"--out={tmp_path / 'x'}", *args)
    assert not any(tmp_path.iterdir())


def test_evaluate_program_error(workdir, tmp_path, repo_env):
    """In a subprocess (the evaluate program's flags): the spec's error, before the metric's
    reference or any sample is computed or written."""
    cmd = [sys.executable, "-m", "ddpm_jax.evaluate", f"--workdir={workdir}", "--metrics=digits",
           "--num_samples=8", "--batch_size=8", "--sampler=dpm++sde", "--order=3", "--steps=20",
           f"--out={tmp_path / 'x'}", f"--cache_dir={tmp_path / 'cache'}"]
    result = subprocess.run(cmd, cwd=REPO, env=repo_env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "order=3 is invalid for DPM-Solver++ SDE: choose one of 1, 2" in result.stderr
    assert not any(tmp_path.iterdir())
    assert not (workdir / "eval").exists()
