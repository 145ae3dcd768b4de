"""``sampler_spec.SamplerSpec``: built from a config or flags, checked once, its names, its JSON
forms (and the sampling.json of earlier versions), and a new sampler registered in ``sampling``'s
tables alone reaching the spec, the flags, the config fields and the chain."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags

from ddpm_jax import diffusion, evaluation, sampler_spec, sampling
from ddpm_jax.configs import _default, mnist5k
from ddpm_jax.sampler_spec import SamplerSpec

# The sampling part of a sampling.json written before SamplerSpec existed (ddpm_jax at 1e6fdc0,
# generation.generate_samples(..., sampler="ddim", num_steps=2, eta=0.0, labels=(2, 0),
# guidance=1.0, guidance_interval=(400, 999)) on a 1000-step model), and its run settings.
OLD_GUIDED = {
    "batch_size": 8, "checkpoint_step": 5, "clip_denoised": True, "eta": 0.0, "guidance": 1.0,
    "guidance_interval": [400, 999], "image_shape": [8, 8, 1], "key_stream": "sample-v2",
    "labels": [2, 0], "mean_type": "eps", "num_classes": 3, "num_steps": 2, "sampler": "ddim",
    "seed": 0, "var_type": "fixedlarge",
}
RUN_KEYS = ("batch_size", "checkpoint_step", "image_shape", "key_stream", "mean_type",
            "num_classes", "seed")


def guided_config():
    config = mnist5k.get_config()  # class-conditional, p_uncond 0.1, guidance 0.5
    config.sample.sampler, config.sample.num_steps = "ddpm", 50  # its grid before DPM-Solver++
    return config


# ----------------------------------------------------------------------------------------------
# Construction from a config and from flags.
# ----------------------------------------------------------------------------------------------
def test_from_config_takes_the_sample_section():
    config = guided_config()
    spec = sampler_spec.from_config(config)
    assert spec == SamplerSpec(1000, sampler="ddpm", num_steps=50, guidance=0.5,
                               var_type="fixedsmall", clip_denoised=True)
    assert spec.options == () and spec.option("eta") == 0.0
    assert spec.chain_kwargs() == dict(sampler="ddpm", num_steps=50, var_type="fixedsmall",
                                       clip_denoised=True)
    grid = sampler_spec.from_config(config, labels="grid")
    assert grid.labels == "grid" and grid.name() == "ddpm_50_w0.5_grid"


def test_the_eval_section_overrides_the_sample_section():
    config = _default.get_config()  # sample: ddpm, all steps; eval: ddim, 100 steps, eta None
    config.sample.eta = 0.3  # the sample section's eta carries over to the eval's DDIM
    spec = sampler_spec.from_config(config, config.eval)
    assert (spec.sampler, spec.num_steps, spec.option("eta")) == ("ddim", 100, 0.3)
    config = guided_config()  # eval section: None everywhere, the sample section's setting
    assert sampler_spec.from_config(config, config.eval) == sampler_spec.from_config(config)


def test_options_belong_to_the_sampler_of_their_layer():
    config = _default.get_config()
    config.sample.sampler, config.sample.eta = "ddim", 1.0
    # --sampler=ddpm over a DDIM section: the section's eta was DDIM's and is dropped.
    assert sampler_spec.from_config(config, {"sampler": "ddpm"}).options == ()
    # An option given with (or above) the sampler that takes none is an error, unless inert.
    with pytest.raises(ValueError, match=r"eta=0\.5 is invalid for sampler 'ddpm'"):
        sampler_spec.from_config(config, {"sampler": "ddpm", "eta": 0.5})
    assert sampler_spec.from_config(config, {"sampler": "ddpm", "eta": 0.0}).options == ()
    config.sample.sampler = "ddpm"  # the same section: its eta=1 is for a sampler without one
    with pytest.raises(ValueError, match=r"eta=1\.0 is invalid for sampler 'ddpm'"):
        sampler_spec.from_config(config)


def parse_flags(*args):
    values = flags.FlagValues()
    sampler_spec.define_flags(values)
    values(["prog", *args])
    return values


def test_from_flags_overrides_the_config():
    config = guided_config()
    values = parse_flags()
    assert sampler_spec.from_flags(config, values) == sampler_spec.from_config(config)
    values = parse_flags("--sampler=ddim", "--steps=20", "--eta=0.5", "--guidance=2",
                         "--guidance_interval=400,999")
    spec = sampler_spec.from_flags(config, values, labels=(1, 2))
    assert spec == SamplerSpec(1000, sampler="ddim", num_steps=20, options={"eta": 0.5},
                               guidance=2.0, guidance_interval=(400, 999), labels=(1, 2),
                               var_type="fixedsmall")
    config.sample.guidance_interval = (0, 500)
    assert sampler_spec.from_flags(config, parse_flags()).guidance_interval == (0, 500)
    assert sampler_spec.from_flags(config, parse_flags("--guidance_interval=all")) \
        .guidance_interval is None
    assert sampler_spec.from_flags(config, parse_flags("--steps=1000")).num_steps is None


def test_flags_and_config_fields_follow_the_declared_options():
    values = parse_flags()
    assert {"sampler", "steps", "guidance", "guidance_interval", *sampling.OPTIONS} <= set(values)
    assert values["sampler"].parser.enum_values == list(sampling.SAMPLERS)
    config = _default.get_config()
    assert set(sampling.OPTIONS) <= set(config.sample) and set(sampling.OPTIONS) <= set(config.eval)
    sampler_spec.define_flags(values)  # a second definition (sample and evaluate) is a no-op


# ----------------------------------------------------------------------------------------------
# Validation: one ValueError naming the field, the value and what is allowed.
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fields, message", [
    (dict(sampler="euler"), "Unknown sampler 'euler'; choose one of ddpm, ddim, dpm++, dpm++sde."),
    (dict(sampler="ddim", options={"eta": -1}), "eta=-1.0 is invalid for sampler 'ddim': eta "
     "must be >= 0"),
    (dict(sampler="ddim", options={"eta": float("nan")}), "eta=nan is invalid for sampler 'ddim'"),
    (dict(sampler="ddim", options={"eta": float("inf")}), "eta=inf is invalid for sampler 'ddim'"),
    (dict(options={"eta": 1}), "eta=1.0 is invalid for sampler 'ddpm', which takes no options: "
     "eta is only used by the 'ddim' sampler"),
    (dict(options={"stages": 2}), "Unknown sampler option stages"),
    (dict(sampler="ddim", options={"eta": "1"}), "eta='1' is invalid: eta is a float, >= 0"),
    (dict(num_steps=0), "num_steps must be an integer in [1, 1000]"),
    (dict(num_steps=1001), "num_steps must be an integer in [1, 1000]"),
    (dict(var_type="learned"), "Unknown var_type 'learned'"),
    (dict(guidance=-1.0), "guidance must be a number >= 0"),
    (dict(guidance=1.0, guidance_interval=(500, 1000)), "guidance_interval=(500, 1000): give "
     "two timestep indices (t_min, t_max) with 0 <= t_min <= t_max <= 999"),
    (dict(guidance=1.0, guidance_interval="a,b"), "guidance_interval='a,b'"),
    (dict(labels="all"), "labels='all': use one of ('random', 'grid', 'none')"),
    (dict(labels=()), "labels=(): use one of"),
])
def test_bad_settings_are_one_clear_error(fields, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        SamplerSpec(1000, **fields)


def test_checks_against_the_model():
    config = guided_config()
    SamplerSpec(1000, guidance=1.0, labels=(9, 0)).check_against(config)
    with pytest.raises(ValueError, match=r"classes in 0\.\.9"):
        SamplerSpec(1000, labels=(10,)).check_against(config)
    with pytest.raises(ValueError, match="num_timesteps=100; the model's has "
                       "config.diffusion.num_timesteps=1000"):
        SamplerSpec(100).check_against(config)
    with pytest.raises(ValueError, match="nothing to guide"):
        SamplerSpec(1000, guidance=1.0, labels="none").check_against(config)
    config.model.p_uncond = 0.0
    with pytest.raises(ValueError, match="trained with label dropout"):
        SamplerSpec(1000, guidance=1.0).check_against(config)
    unconditional = mnist5k.get_config("unconditional")
    with pytest.raises(ValueError, match="needs class labels"):
        SamplerSpec(1000, guidance=1.0).check_against(unconditional)
    with pytest.raises(ValueError, match="needs class labels"):  # from_config checks it too
        sampler_spec.from_config(unconditional, {"guidance": 1.0})


def test_normal_form():
    """All steps are None; no guidance has no interval; a list of labels is a tuple."""
    spec = SamplerSpec(1000, sampler="ddim", num_steps=1000, guidance=0,
                       guidance_interval=(1, 2), labels=[3, 1], options={"eta": 1})
    assert (spec.num_steps, spec.guidance, spec.guidance_interval, spec.labels, spec.options) \
        == (None, 0.0, None, (3, 1), (("eta", 1.0),))
    assert spec.steps == 1000 and hash(spec) == hash(dataclasses.replace(spec))


# ----------------------------------------------------------------------------------------------
# Names and JSON.
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fields, name, tag, description", [
    (dict(), "ddpm_1000", "ddpm1000", "ddpm 1000 steps"),
    (dict(sampler="ddim", num_steps=100, options={"eta": 0.5}), "ddim_100", "ddim100",
     "ddim 100 steps"),
    (dict(num_steps=50, guidance=1.0, guidance_interval=(400, 999)), "ddpm_50_w1_t400-999",
     "ddpm50_w1_t400-999", "ddpm 50 steps, guidance w=1 at t 400-999"),
    (dict(sampler="ddim", num_steps=2, guidance=2.0, labels="grid"), "ddim_2_w2_grid",
     "ddim2_w2_grid", "ddim 2 steps, guidance w=2, labels grid"),
    (dict(num_steps=3, labels=(1, 4, 7)), "ddpm_3_y1-4-7", "ddpm3_y1-4-7",
     "ddpm 3 steps, labels y1-4-7"),
])
def test_names(fields, name, tag, description):
    """The names of today's settings, as directories and results files have had them."""
    spec = SamplerSpec(1000, **fields)
    assert (spec.name(), spec.tag(), spec.describe()) == (name, tag, description)


@pytest.mark.parametrize("fields", [
    dict(),
    dict(sampler="ddim", num_steps=7, options={"eta": 0.25}, labels="none"),
    dict(num_steps=50, guidance=1.5, guidance_interval=(0, 999), labels=(2, 0), clip_denoised=False,
         var_type="fixedsmall"),
])
def test_json_round_trip(fields):
    spec = SamplerSpec(1000, **fields)
    assert SamplerSpec.from_json(spec.to_json(), 1000) == spec
    summary = spec.summary()  # a results record: of random labels, as evaluations draw them
    read = SamplerSpec.from_summary(summary)
    assert read.tag() == dataclasses.replace(spec, labels="random").tag()
    assert summary["num_steps"] == spec.steps and read.steps == spec.steps


def test_sampling_json_of_earlier_versions():
    """Today's form is the file of the code before SamplerSpec; a file without the settings
    added since (guidance_interval, eta, ...) reads as their defaults."""
    spec = SamplerSpec(1000, sampler="ddim", num_steps=2, options={"eta": 0.0}, guidance=1.0,
                       guidance_interval=(400, 999), labels=(2, 0))
    assert SamplerSpec.from_json(OLD_GUIDED, 1000) == spec
    assert spec.to_json() == {k: v for k, v in OLD_GUIDED.items() if k not in RUN_KEYS}
    older = {k: v for k, v in OLD_GUIDED.items() if k not in ("guidance_interval", "eta")}
    assert SamplerSpec.from_json(older, 1000) == dataclasses.replace(spec, guidance_interval=None)


def test_results_record_keeps_its_keys():
    """A results record's protocol: the keys of the code before SamplerSpec, a sampler's own
    options declared since (DPM-Solver++'s) only in its records, None when the figure sampled
    nothing (bits/dim)."""
    spec = SamplerSpec(1000, sampler="ddim", num_steps=2)
    record = evaluation.Protocol(num_samples=10, spec=spec, checkpoint_step=5).to_json()
    assert record == dict(num_samples=10, sampler="ddim", num_steps=2, eta=0.0, guidance=0.0,
                          guidance_interval=None, checkpoint_step=5, convention=None,
                          reference=None, reference_images=None)
    solver = SamplerSpec(1000, sampler="dpm++", num_steps=20, options={"order": 3})
    record = evaluation.Protocol(num_samples=10, spec=solver, checkpoint_step=5).to_json()
    assert (record["eta"], record["order"], record["spacing"]) == (0.0, 3, "time")
    assert evaluation.Protocol.from_json(record).spec == dataclasses.replace(
        solver, num_timesteps=None)
    bpd = evaluation.Protocol(num_samples=10, reference="mnist5k:test").to_json()
    assert {k: bpd[k] for k in sampler_spec.summary_keys()} == dict.fromkeys(
        ("sampler", "num_steps", "eta", "guidance", "guidance_interval"))
    assert evaluation.Protocol.from_json(bpd).spec is None


# ----------------------------------------------------------------------------------------------
# A new sampler: declared in sampling.SAMPLERS and sampling.OPTIONS, nothing else.
# ----------------------------------------------------------------------------------------------
def _fake_step(sched, model_output, x, i, noise, *, stages, **kw):
    del stages
    return sampling.SAMPLERS["ddpm"].step(sched, model_output, x, i, noise, **kw)


def _check_stages(num_timesteps, num_steps, *, stages):
    del num_timesteps
    if num_steps < stages:
        raise ValueError(f"stages={stages} needs at least {stages} steps, got {num_steps}.")


@pytest.fixture
def fake_sampler(monkeypatch):
    monkeypatch.setitem(sampling.OPTIONS, "stages", sampling.Option(
        int, 2, lambda k: 1 <= k <= 3, "1, 2 or 3", "solver stages"))
    monkeypatch.setitem(sampling.SAMPLERS, "fake", sampling.Sampler(
        _fake_step, ("stages",), "ancestral sampling with stages", _check_stages))


def test_a_new_sampler_needs_only_its_declaration(fake_sampler):
    config = _default.get_config()
    sampler_spec.add_option_fields(config.sample, inherit=False)
    assert config.sample.stages == 2
    values = parse_flags("--sampler=fake", "--steps=20", "--stages=3")
    spec = sampler_spec.from_flags(config, values)
    assert spec.options == (("stages", 3),)
    assert (spec.name(), spec.tag(), spec.describe()) == (
        "fake_20_stages3", "fake20_stages3", "fake 20 steps, stages 3")
    assert spec.to_json()["stages"] == 3 and spec.to_json()["eta"] == 0.0
    assert SamplerSpec.from_json(spec.to_json(), 1000) == spec
    assert sampler_spec.from_config(config, {"sampler": "fake"}).option("stages") == 2
    # An older file without the new option still reads, as its default.
    old = {k: v for k, v in SamplerSpec(1000).to_json().items() if k != "stages"}
    assert SamplerSpec.from_json(old, 1000) == SamplerSpec(1000)
    with pytest.raises(ValueError, match="stages=3 is invalid for sampler 'ddim', which takes the "
                       "options eta: stages is only used by the 'fake' sampler"):
        sampler_spec.from_flags(config, parse_flags("--sampler=ddim", "--stages=3"))
    with pytest.raises(ValueError, match="stages=4 is invalid for sampler 'fake': stages must be "
                       "1, 2 or 3"):
        SamplerSpec(1000, sampler="fake", options={"stages": 4})
    with pytest.raises(ValueError, match="stages=3 needs at least 3 steps, got 2"):
        SamplerSpec(1000, sampler="fake", num_steps=2, options={"stages": 3})
    # The chain runs it with its option.
    sched = diffusion.make_schedule("linear", 1000)
    model_fn = lambda x, t: 0.1 * x  # noqa: E731
    draw = lambda **kw: sampling.sample(model_fn, sched, jax.random.key(0),  # noqa: E731
                                        (2, 3, 3, 1), **kw)
    kw = spec.chain_kwargs()
    assert kw["stages"] == 3
    ddpm = {k: v for k, v in kw.items() if k != "stages"} | {"sampler": "ddpm"}
    np.testing.assert_array_equal(draw(**kw), draw(**ddpm))  # the fake step is DDPM's
    assert jnp.all(jnp.isfinite(draw(sampler="fake", num_steps=5, stages=1)))
