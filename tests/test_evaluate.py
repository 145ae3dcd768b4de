"""`python -m ddpm_jax.evaluate` end to end on a tiny checkpoint with random Inception weights:
exact sample counts, figures equal to a direct computation, resumption, bits/dim, errors; and
the trainer's periodic evaluation with its best checkpoint."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from flax import traverse_util
from test_sample_cli import random_params, tiny_config

import ddpm_jax.datasets  # noqa: F401  (registers mnist5k)
from ddpm_jax import checkpointing, diffusion, evaluation, sampler_spec, sampling, training
from ddpm_jax.metrics import inception, statistics
from ddpm_jax.models import unet_from_config

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """Random FID-Inception weights in the converted .npz format (BatchNorm statistics random
    too), built from shapes only."""
    shapes = jax.eval_shape(inception.FIDInceptionV3().init, jax.random.key(0),
                            jnp.zeros((1, 299, 299, 3)))
    rng = np.random.default_rng(0)
    flat = {}
    for path, s in traverse_util.flatten_dict(shapes).items():
        leaf = path[-1]
        if leaf == "kernel":
            value = rng.standard_normal(s.shape) / np.sqrt(np.prod(s.shape[:-1]))
        elif leaf == "var":
            value = rng.uniform(0.5, 1.5, s.shape)
        elif leaf == "scale":
            value = rng.uniform(0.8, 1.2, s.shape)
        else:  # bias, mean
            value = 0.1 * rng.standard_normal(s.shape)
        flat["/".join(path)] = value.astype(np.float32)
    path = tmp_path_factory.mktemp("inception") / "inception_fid.npz"
    np.savez(path, **flat)
    return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    config = tiny_config()
    path = tmp_path_factory.mktemp("run")
    checkpointing.save_params_checkpoint(path, random_params(config), config, step=5)
    return path


def run_cli(env, *args):
    cmd = [sys.executable, "-m", "ddpm_jax.evaluate", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_fid_is_kid_end_to_end_and_resumed(workdir, inception_weights, tmp_path, repo_env):
    rng = np.random.default_rng(1)
    ref_images = rng.integers(0, 256, (12, 8, 8, 1), dtype=np.uint8)
    np.savez(tmp_path / "ref.npz", ref_images)
    args = [f"--workdir={workdir}", "--metrics=fid,is,kid", "--num_samples=10", "--batch_size=8",
            "--sampler=ddim", "--steps=2", f"--inception_weights={inception_weights}",
            f"--reference={tmp_path / 'ref.npz'}", "--feature_batch_size=8",
            f"--cache_dir={tmp_path / 'cache'}"]
    first = run_cli(repo_env, *args)
    assert first.returncode == 0, first.stderr[-3000:]
    results = workdir / "eval" / "5_10_ddim2_tf.json"
    assert f"Wrote {results}" in first.stdout.splitlines()[-1]
    assert "10 samples, ddim 2 steps, tf convention" in first.stdout
    [record] = json.loads(results.read_text())
    assert record["protocol"] == dict(
        num_samples=10, sampler="ddim", num_steps=2, eta=0.0, guidance=0.0,
        guidance_interval=None, checkpoint_step=5, convention="tf",
        reference=str(tmp_path / "ref.npz"), reference_images=12)

    # The same figures computed directly from the sample file and the reference images.
    with np.load(workdir / "samples_ddim_2" / "samples.npz") as f:
        samples = f["arr_0"]
    assert samples.shape == (10, 8, 8, 1)  # exactly --num_samples, not a multiple of the batch
    fn = jax.jit(inception.make_inception_fn(inception.load_variables(inception_weights)))
    ours, real = fn(samples), fn(ref_images)
    pool, ref_pool = np.asarray(ours["2048"], np.float64), np.asarray(real["2048"], np.float64)
    fid = statistics.frechet_distance(pool.mean(0), np.cov(pool, rowvar=False),
                                      ref_pool.mean(0), np.cov(ref_pool, rowvar=False))
    is_mean, _ = statistics.inception_score(np.asarray(ours["logits_unbiased"]))
    kid, _ = statistics.kernel_inception_distance(pool, ref_pool, subset_size=10)
    metrics = record["metrics"]
    np.testing.assert_allclose(metrics["fid"], fid, rtol=1e-4)
    np.testing.assert_allclose(metrics["is"], is_mean, rtol=1e-5)
    np.testing.assert_allclose(metrics["kid"], kid, rtol=1e-3, atol=1e-7)

    # A kill after the first chunk: the rerun reuses it and gives the same figures.
    chunk0 = workdir / "samples_ddim_2" / "samples_00000.npz"
    mtime = chunk0.stat().st_mtime_ns
    for name in ("samples_00001.npz", "samples.npz"):
        (workdir / "samples_ddim_2" / name).unlink()
    results.unlink()
    again = run_cli(repo_env, *args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert chunk0.stat().st_mtime_ns == mtime
    assert "(1 of 2 chunks to draw)" in again.stderr
    np.testing.assert_allclose(json.loads(results.read_text())[0]["metrics"]["fid"], fid,
                               rtol=1e-4)


def test_protocol_names_the_guidance_and_its_interval(tmp_path):
    spec = sampler_spec.SamplerSpec(1000, sampler="ddpm", num_steps=50, guidance=1.0,
                                    guidance_interval=(400, 999))
    protocol = evaluation.Protocol(num_samples=500, spec=spec, reference="mnist5k:train")
    assert protocol.tag() == "500_ddpm50_w1_t400-999"
    line = evaluation.describe({"digits_fd": 12.5}, protocol)
    assert line == "digits FD 12.5 (500 samples, ddpm 50 steps, guidance w=1 at t 400-999, vs " \
                   "mnist5k:train)"
    evaluation.write_results(tmp_path / "r.json", [({"digits_fd": 12.5}, protocol)])
    [(_, read)] = evaluation.read_results(tmp_path / "r.json")
    assert read.tag() == protocol.tag() and list(read.spec.guidance_interval) == [400, 999]
    full = dataclasses.replace(protocol, spec=dataclasses.replace(spec, guidance_interval=None))
    assert full.tag() == "500_ddpm50_w1" and "guidance w=1, vs" in evaluation.describe({}, full)


def test_missing_weights_is_one_clear_error(workdir, tmp_path, repo_env):
    env = {k: v for k, v in repo_env.items() if k != inception.WEIGHTS_ENV}
    result = run_cli(env, f"--workdir={workdir}", "--metrics=fid", "--num_samples=8",
                     "--batch_size=8", f"--reference={tmp_path / 'ref.npz'}")
    assert result.returncode != 0
    last = " ".join(result.stderr.strip().splitlines()[-4:])
    assert inception.WEIGHTS_FILE in last and inception.WEIGHTS_URL in last
    assert "--inception_weights" in last and inception.WEIGHTS_ENV in last
    assert "Traceback" not in result.stderr
    assert not (workdir / "samples_ddpm_1000").exists()  # failed before sampling


def test_scores_a_samples_file_with_the_digits_metric(tmp_path, repo_env):
    real = tfds.as_numpy(tfds.load("mnist5k", split="train[:200]", batch_size=-1))
    np.savez(tmp_path / "digits.npz", real["image"], labels=real["label"])
    result = run_cli(repo_env, f"--samples={tmp_path / 'digits.npz'}", "--metrics=digits")
    assert result.returncode == 0, result.stderr[-3000:]
    [record] = json.loads((tmp_path / "digits.npz.eval.json").read_text())
    assert record["protocol"]["num_samples"] == 200
    assert record["metrics"]["digits_accuracy"] > 0.95
    assert record["metrics"]["class_coverage"] > 0.9


def test_bits_per_dim_on_a_split(workdir, repo_env):
    result = run_cli(repo_env, f"--workdir={workdir}", "--metrics=bpd",
                     "--bpd_split=train[:10]", "--bpd_batch_size=6")  # 8 devices: padded
    assert result.returncode == 0, result.stderr[-3000:]
    [record] = json.loads((workdir / "eval" / "5_10.json").read_text())
    assert record["protocol"]["num_samples"] == 10
    assert record["protocol"]["reference"] == "mnist5k:train[:10]"

    # Directly: the same 10 images (6 + 4), batch k's noise from fold_in(key(0), k).
    params, config, _ = checkpointing.load_ema_params(workdir)
    model = unet_from_config(config.model, config.data.num_channels)
    data = _pipeline_images(config)
    sched = diffusion.schedule_from_config(config.diffusion)
    fn = sampling.make_model_fn(model, params)
    values = []
    for k, x in enumerate((data[:6], data[6:])):
        x0 = x.astype(np.float32) / 127.5 - 1
        out = diffusion.bits_per_dim(sched, fn, x0, jax.random.fold_in(jax.random.key(0), k),
                                     timesteps_per_chunk=10)
        values.append(np.asarray(out["total_bpd"]))
    np.testing.assert_allclose(record["metrics"]["bpd"], np.concatenate(values).mean(), rtol=1e-5)


def _pipeline_images(config):
    """The first 10 mnist5k digits as the pipeline preprocesses them for this 8x8 model."""
    from ddpm_jax import input_pipeline

    _, batches = input_pipeline.iterate_split(config.data, "train[:10]", 10)
    return next(batches)["image"]


def test_training_evaluates_and_keeps_the_best(tmp_path, monkeypatch):
    import runpy

    config = runpy.run_path(str(REPO / "configs" / "tiny.py"))["get_config"]()
    config.data.image_size = 28  # the digits metric's images
    config.eval.every_steps = 2
    config.eval.num_samples = 12
    config.eval.batch_size = 8
    state = training.train_and_evaluate(config, tmp_path)
    assert int(state.step) == 4
    records = {step: json.loads((tmp_path / "eval" / f"{step}_12_ddim2.json").read_text())[0]
               for step in (2, 4)}
    for step, record in records.items():
        assert record["protocol"]["checkpoint_step"] == step
        assert record["protocol"]["num_samples"] == 12
        assert set(record["metrics"]) >= {"digits_fd", "class_coverage"}
    best_step = min(records, key=lambda s: records[s]["metrics"]["digits_fd"])
    best = json.loads((tmp_path / "best" / "best.json").read_text())
    assert best == dict(metric="digits_fd", step=best_step,
                        value=records[best_step]["metrics"]["digits_fd"])
    params, _, step = checkpointing.load_ema_params(tmp_path / "best")
    assert step == best_step
    if best_step == 4:
        jax.tree.map(np.testing.assert_array_equal, params,
                     jax.tree.map(np.asarray, state.ema_params))
    assert os.path.isdir(tmp_path / "checkpoints" / "4")


def test_reference_statistics_alone(inception_weights, tmp_path, repo_env):
    images = np.random.default_rng(2).integers(0, 256, (9, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "real.npz", images)
    result = run_cli(repo_env, f"--reference={tmp_path / 'real.npz'}", "--image_size=8",
                     f"--inception_weights={inception_weights}", "--feature_batch_size=8",
                     f"--cache_dir={tmp_path / 'cache'}")
    assert result.returncode == 0, result.stderr[-3000:]
    path = Path(result.stdout.strip().splitlines()[-1].rpartition(": ")[2])
    assert path.parent == tmp_path / "cache" / "reference"
    mu, sigma, meta = statistics.load_statistics(path)
    assert mu.shape == (2048,) and sigma.shape == (2048, 2048)
    assert meta == dict(source=str(tmp_path / "real.npz"), convention="tf", num_images=9,
                        image_size=8, feature="inception-2048")
