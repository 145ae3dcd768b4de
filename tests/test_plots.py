"""ddpm_jax.plots: each figure's data is the library's (and its closed form), the command writes
valid, small PNGs, and without matplotlib it stops with one line saying how to install it."""

import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from ddpm_jax import diffusion, images, plots, summary
from ddpm_jax.models import timestep_embedding


def _alphas_cumprod_f64(name: str, num_timesteps: int) -> np.ndarray:
    return np.cumprod(1.0 - diffusion.get_beta_schedule(name, num_timesteps))


def test_schedule_curves_are_the_schedule_tables():
    curves = plots.schedule_curves(200)
    assert list(curves) == list(diffusion.SCHEDULES)
    for name, curve in curves.items():
        sched = diffusion.make_schedule(name, 200)
        np.testing.assert_array_equal(curve["sqrt_alphas_cumprod"], sched.sqrt_alphas_cumprod)
        np.testing.assert_array_equal(
            curve["sqrt_one_minus_alphas_cumprod"], sched.sqrt_one_minus_alphas_cumprod
        )
        alpha_bar = _alphas_cumprod_f64(name, 200)
        with np.errstate(divide="ignore"):
            expected = np.log(alpha_bar / (1.0 - alpha_bar))  # float64 closed form
        finite = np.isfinite(expected)
        np.testing.assert_array_equal(np.isfinite(curve["log_snr"]), finite)
        np.testing.assert_allclose(curve["log_snr"][finite], expected[finite], rtol=1e-5, atol=1e-5)
    assert curves["jsd"]["log_snr"][-1] == -np.inf  # ᾱ_T = 0
    assert np.all(np.diff(curves["linear"]["log_snr"]) < 0)


@pytest.mark.parametrize("layout", ["concat", "interleaved"])
def test_embedding_table_is_timestep_embedding(layout):
    table = plots.embedding_table(16, layout, num_t=51)
    np.testing.assert_array_equal(
        table, timestep_embedding(jnp.arange(51, dtype=jnp.int32), 16, layout=layout)
    )
    t = np.arange(51, dtype=np.float64)[:, None]
    if layout == "concat":  # [sin, cos] with f_i = 10000^(-i/7), i < 8
        angles = t * 10000.0 ** (-np.arange(8) / 7)
        expected = np.concatenate([np.sin(angles), np.cos(angles)], axis=1)
    else:  # PE(t, 2i) = sin(t / 10000^(2i/16)), PE(t, 2i+1) = cos(...)
        angles = t / 10000.0 ** (2 * np.arange(8) / 16)
        expected = np.stack([np.sin(angles), np.cos(angles)], axis=-1).reshape(51, 16)
    np.testing.assert_allclose(table, expected, atol=2e-5)


def test_forward_strip_is_q_sample_with_one_noise_draw():
    rng = np.random.default_rng(0)
    x0 = rng.uniform(-1, 1, (6, 5, 1)).astype(np.float32)
    noise = rng.standard_normal((6, 5, 1)).astype(np.float32)
    timesteps = plots.strip_timesteps(100, count=4)
    np.testing.assert_array_equal(timesteps, [0, 33, 66, 99])
    names = ("linear", "cosine")
    frames = plots.forward_frames(x0, noise, timesteps, names, num_timesteps=100)
    assert frames.shape == (2, 4, 6, 5, 1)
    for row, name in enumerate(names):
        alpha_bar = _alphas_cumprod_f64(name, 100)[timesteps][:, None, None, None]
        expected = np.sqrt(alpha_bar) * x0 + np.sqrt(1.0 - alpha_bar) * noise
        np.testing.assert_allclose(frames[row], expected, atol=1e-5)

    strip = plots.forward_strip(x0, noise, timesteps, names, num_timesteps=100, padding=1)
    assert strip.shape == (2 * 7 + 1, 5 * 6 + 1, 1) and strip.dtype == np.uint8
    cells = [np.asarray(images.to_uint8(x0))] + [np.asarray(images.to_uint8(f)) for f in frames[0]]
    cells += [np.asarray(images.to_uint8(x0))] + [np.asarray(images.to_uint8(f)) for f in frames[1]]
    for k, cell in enumerate(cells):
        top, left = 1 + (k // 5) * 7, 1 + (k % 5) * 6
        np.testing.assert_array_equal(strip[top : top + 6, left : left + 5], cell)
    assert (strip[0] == 255).all()  # white padding


def _write_losses(workdir, steps, offset):
    writer = summary.SummaryWriter(workdir)
    for step in steps:
        writer.scalars(step, {f"loss_t_q{q}": offset + q + step / 1000 for q in range(4)})
    writer.close()


def test_loss_by_t_quarter_reads_the_trainer_scalars(tmp_path):
    _write_losses(tmp_path, [10, 20, 30], offset=0.0)
    time.sleep(1.1)  # event files are named by the second they are created in
    _write_losses(tmp_path, [30, 40], offset=10.0)  # a resumed run logs step 30 again
    losses = plots.loss_by_t_quarter(tmp_path)
    assert sorted(losses) == [f"loss_t_q{q}" for q in range(4)]
    steps, values = losses["loss_t_q2"]
    np.testing.assert_array_equal(steps, [10, 20, 30, 40])
    np.testing.assert_allclose(values, [2.01, 2.02, 12.03, 12.04], rtol=1e-6)

    with pytest.raises(FileNotFoundError, match="No TensorBoard event files"):
        plots.loss_by_t_quarter(tmp_path / "missing")
    other = tmp_path / "other"
    summary.SummaryWriter(other).scalars(1, {"loss": 1.0})
    with pytest.raises(ValueError, match="none of the scalars"):
        plots.loss_by_t_quarter(other)


def test_command_writes_every_figure(tmp_path, repo_env):
    workdir = tmp_path / "run"
    _write_losses(workdir, [50, 100, 150], offset=0.1)
    out = tmp_path / "figures"
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "ddpm_jax.plots", f"--out={out}", f"--workdir={workdir}",
         f"--data_dir={tmp_path / 'tfds'}", "--num_timesteps=200"],
        env=repo_env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - start < 60
    names = ["schedules", "time_embedding", "forward_process", "loss_by_t_quarter"]
    for name in names:
        path = out / f"{name}.png"
        assert f"Wrote {path}" in result.stdout
        assert 5_000 < path.stat().st_size < 150_000, (name, path.stat().st_size)
        with Image.open(path) as png:
            png.verify()
            assert png.format == "PNG" and png.width >= 600 and png.height >= 250
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{n}.png" for n in names)


def test_without_matplotlib_one_line_says_how_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib... -> ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(SystemExit) as exit_info:
        plots.main(["--out", str(tmp_path / "figures")])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"python -m ddpm_jax.plots: error: {plots.INSTALL_HINT}"]
    assert 'pip install "ddpm_jax[plots]"' in err[0]
    assert not (tmp_path / "figures").exists()
