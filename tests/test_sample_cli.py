"""`python -m ddpm_jax.sample` end to end on a tiny UNet checkpoint: files, resumption, sharding,
class labels and errors. Compiling the sampler is the cost here: each test compiles at most once.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from absl import app, flags
from absl.testing import flagsaver
from PIL import Image

from ddpm_jax import checkpointing, generation, sample, sampler_spec
from ddpm_jax.models import unet_from_config

REPO = Path(__file__).resolve().parent.parent
SIZE = 8
SETTINGS = dict(batch_size=8, seed=0, checkpoint_step=5)


def spec(config, labels="random", **fields):
    """The tests' sampling setting: DDIM (eta 0) on 3 steps, unless ``fields`` say otherwise."""
    return sampler_spec.from_config(
        config, {"sampler": "ddim", "num_steps": 3, "eta": 0.0, **fields}, labels=labels)


def tiny_config(num_classes=None):
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = dict(dataset="mnist5k", image_size=SIZE, num_channels=1, class_conditional=False)
    c.model = dict(ch=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), dropout=0.0,
                   resamp_with_conv=True, num_classes=num_classes, dtype="float32")
    c.diffusion = dict(schedule="linear", num_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                       mean_type="eps", var_type="fixedlarge")
    c.sample = dict(sampler="ddpm", num_steps=None, eta=0.0, clip_denoised=True, num_images=8)
    return c


def random_params(config):
    """Small random weights of the config's UNet, built from shapes only (no compilation)."""
    model = unet_from_config(config.model, config.data.num_channels)
    x, t = jnp.zeros((1, SIZE, SIZE, 1)), jnp.zeros((1,), jnp.int32)
    y = None if config.model.num_classes is None else t
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, t, y))["params"]
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: (0.05 * rng.standard_normal(s.shape)).astype(s.dtype), shapes)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    config = tiny_config()
    path = tmp_path_factory.mktemp("run")
    checkpointing.save_params_checkpoint(path, random_params(config), config, step=5)
    return path


def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """`python -m ddpm_jax.sample *args` in a fresh process with environment ``env``."""
    cmd = [sys.executable, "-m", "ddpm_jax.sample", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def cli_out(workdir, repo_env):
    """One real `python -m ddpm_jax.sample` run on 2 devices (the tests themselves see 8)."""
    env = dict(repo_env, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    result = run_cli(env, f"--workdir={workdir}", "--num_samples=10", "--batch_size=8",
                     "--sampler=ddim", "--steps=3", "--trajectory")
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir / "samples_ddim_3", result.stderr


def load(path, key="arr_0"):
    with np.load(path) as f:
        return f[key] if key in f.files else None


def test_cli_writes_chunks_merged_npz_grid_and_trajectory(cli_out):
    out, log = cli_out
    assert sorted(p.name for p in out.iterdir()) == [
        "grid.png", "samples.npz", "samples_00000.npz", "samples_00001.npz", "sampling.json",
        "trajectory_pred_x0.png", "trajectory_x_t.png",
    ]  # and no temporary files left behind
    chunks = [load(out / f"samples_{c:05d}.npz") for c in range(2)]
    merged = load(out / "samples.npz")
    assert merged.shape == (10, SIZE, SIZE, 1) and merged.dtype == np.uint8
    np.testing.assert_array_equal(merged, np.concatenate(chunks)[:10])
    assert load(out / "samples.npz", "labels") is None
    assert len({x.tobytes() for x in merged}) == 10  # ten different images
    with Image.open(out / "grid.png") as grid:  # 10 images: 4 columns, 3 rows, padding 2
        assert grid.size == (4 * (SIZE + 2) + 2, 3 * (SIZE + 2) + 2)
    with Image.open(out / "trajectory_x_t.png") as strip:  # 8 rows; 3 steps + the final sample
        assert strip.size == (4 * (SIZE + 2) + 2, 8 * (SIZE + 2) + 2)
    assert "img/s" in log


def test_rerun_skips_chunks_on_disk_and_is_device_count_independent(cli_out, workdir, tmp_path):
    out, _ = cli_out
    rerun = tmp_path / "rerun"
    shutil.copytree(out, rerun)
    (rerun / "samples_00001.npz").unlink()
    (rerun / "samples.npz").unlink()
    # Written before sample settings had a guidance_interval: a missing setting is its default.
    settings_file = rerun / generation.SETTINGS_FILE
    recorded = json.loads(settings_file.read_text())
    del recorded["guidance_interval"]
    settings_file.write_text(json.dumps(recorded))
    np.savez(rerun / "samples_00000.npz", arr_0=np.zeros((8, SIZE, SIZE, 1), np.uint8))
    params, config, _ = checkpointing.load_ema_params(workdir)
    generation.generate_samples(params, config, rerun, spec(config), num_samples=10, **SETTINGS)
    # Chunk 0 was skipped; chunk 1, redrawn here on 8 devices, equals the CLI's on 2 devices.
    np.testing.assert_array_equal(load(rerun / "samples_00000.npz"), 0)
    np.testing.assert_array_equal(
        load(rerun / "samples_00001.npz"), load(out / "samples_00001.npz")
    )
    expected = np.concatenate([np.zeros((8, SIZE, SIZE, 1)), load(out / "samples_00001.npz")])
    np.testing.assert_array_equal(load(rerun / "samples.npz"), expected[:10])


def test_class_conditional_samples_carry_labels(tmp_path):
    config = tiny_config(num_classes=3)
    path = generation.generate_samples(random_params(config), config, tmp_path,
                                       spec(config, sampler="ddpm", num_steps=2), num_samples=5,
                                       **SETTINGS)
    labels, chunk_labels = load(path, "labels"), load(tmp_path / "samples_00000.npz", "labels")
    assert load(path).shape == (5, SIZE, SIZE, 1) and labels.shape == (5,)
    np.testing.assert_array_equal(labels, chunk_labels[:5])
    assert labels.dtype == np.int32 and set(chunk_labels) <= {0, 1, 2}
    assert len(set(chunk_labels)) > 1


def test_refuses_to_mix_settings_and_bad_batch_sizes(cli_out, workdir, tmp_path):
    out, _ = cli_out
    params, config, _ = checkpointing.load_ema_params(workdir)
    with pytest.raises(ValueError, match="seed: 0 on disk != 1 now"):
        generation.generate_samples(params, config, out, spec(config), num_samples=10,
                                    **dict(SETTINGS, seed=1))
    with pytest.raises(ValueError, match="--batch_size=0 must be a positive integer"):
        generation.generate_samples(params, config, tmp_path, spec(config), num_samples=10,
                                    **dict(SETTINGS, batch_size=0))
    with pytest.raises(ValueError, match="num_steps"):
        generation.generate_samples(params, config, tmp_path, spec(config, num_steps=0),
                                    num_samples=10, **SETTINGS)
    with pytest.raises(ValueError, match="eta"):
        generation.generate_samples(params, config, tmp_path, spec(config, sampler="ddpm",
                                    eta=0.5), num_samples=10, **SETTINGS)
    assert not any(tmp_path.iterdir())  # nothing written for rejected settings


def run_main(*args):
    with flagsaver.flagsaver():
        flags.FLAGS(["ddpm_jax.sample", *args])
        sample.main(["ddpm_jax.sample"])


def test_cli_errors(workdir, tmp_path):
    with pytest.raises(app.UsageError, match="exactly one"):
        run_main()
    with pytest.raises(app.UsageError, match="exactly one"):
        run_main(f"--workdir={workdir}", f"--checkpoint={workdir}/checkpoints/5")
    with pytest.raises(app.UsageError, match="--out"):
        run_main(f"--checkpoint={workdir}/checkpoints/5")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_main(f"--workdir={tmp_path / 'missing'}")
    with pytest.raises(FileNotFoundError, match="No checkpoint"):
        run_main(f"--workdir={tmp_path}")


def test_damaged_checkpoint_is_a_clear_error(workdir, tmp_path, repo_env):
    """In a subprocess: after a failed restore, TensorStore's in-flight reads call back into
    Orbax's closed asyncio loop from other threads, which can break the process that tried."""
    damaged = tmp_path / "damaged"
    shutil.copytree(workdir / "checkpoints", damaged / "checkpoints")
    for f in damaged.glob("checkpoints/5/state/**/d/*"):
        f.write_bytes(b"not a checkpoint")
    result = run_cli(repo_env, f"--workdir={damaged}")
    assert result.returncode != 0
    assert f"Could not read a checkpoint from {damaged}:" in result.stderr
    assert not list(damaged.glob("samples_*"))


# ----------------------------------------------------------------------------------------------
# Classifier-free guidance: --guidance and --labels.
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def guided_workdir(tmp_path_factory):
    """A 3-class checkpoint trained (here: random weights) with label dropout: 4 embedding rows."""
    config = tiny_config(num_classes=3)
    config.data.class_conditional = True
    config.model.p_uncond = 0.1
    path = tmp_path_factory.mktemp("guided_run")
    checkpointing.save_params_checkpoint(path, random_params(config), config, step=5)
    return path


def test_cli_guidance_and_label_grid_end_to_end(guided_workdir, repo_env):
    env = dict(repo_env, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    result = run_cli(env, f"--workdir={guided_workdir}", "--num_samples=6", "--batch_size=6",
                     "--sampler=ddim", "--steps=2", "--guidance=2", "--labels=all",
                     "--guidance_interval=500,999")  # guides t = 999, not t = 0
    assert result.returncode == 0, result.stderr[-3000:]
    out = guided_workdir / "samples_ddim_2_w2_t500-999_grid"
    settings = json.loads((out / generation.SETTINGS_FILE).read_text())
    assert settings["guidance"] == 2.0 and settings["labels"] == "grid"
    assert settings["guidance_interval"] == [500, 999]
    np.testing.assert_array_equal(load(out / "samples.npz", "labels"), [0, 1, 2, 0, 1, 2])


def test_resumes_a_directory_of_the_code_before_sampler_specs(guided_workdir, tmp_path):
    """sampling.json as ddpm_jax at 1e6fdc0 wrote it for this setting: the chunks are resumed
    and the file stays as it was, byte for byte."""
    from test_sampler_spec import OLD_GUIDED

    params, config, _ = checkpointing.load_ema_params(guided_workdir)
    out = tmp_path / "old"
    out.mkdir()
    text = json.dumps(OLD_GUIDED, indent=2, sort_keys=True) + "\n"
    (out / generation.SETTINGS_FILE).write_text(text)
    setting = spec(config, num_steps=2, labels=(2, 0), guidance=1.0, guidance_interval=(400, 999))
    generation.generate_samples(params, config, out, setting, num_samples=8, **SETTINGS)
    assert (out / generation.SETTINGS_FILE).read_text() == text
    generation.generate_samples(params, config, tmp_path / "new", setting, num_samples=8,
                                **SETTINGS)
    assert (tmp_path / "new" / generation.SETTINGS_FILE).read_text() == text


def test_labels_list_none_and_refusals(guided_workdir, workdir, tmp_path):
    params, config, _ = checkpointing.load_ema_params(guided_workdir)
    def draw(out, **fields):
        return generation.generate_samples(params, config, out, spec(config, num_steps=2,
                                           **fields), num_samples=8, **SETTINGS)

    path = draw(tmp_path / "list", labels=(2, 0), guidance=1.0)
    np.testing.assert_array_equal(load(path, "labels"), [2, 0] * 4)
    with pytest.raises(ValueError, match="guidance: 1.0 on disk != 0.5 now"):
        draw(tmp_path / "list", labels=(2, 0), guidance=0.5)
    with pytest.raises(ValueError, match=r"guidance_interval: None on disk != \[400, 999\] now"):
        draw(tmp_path / "list", labels=(2, 0), guidance=1.0, guidance_interval=(400, 999))
    for bad in ("999,400", "400", "a,b", "0,1000"):
        with pytest.raises(ValueError, match="guidance_interval=.*t_min <= t_max <= 999"):
            run_main(f"--workdir={guided_workdir}", f"--out={tmp_path / 'x'}", "--guidance=1",
                     f"--guidance_interval={bad}")
    path = draw(tmp_path / "none", labels="none")
    with np.load(path) as f:  # unconditional samples carry no labels
        assert f.files == ["arr_0"]
    with pytest.raises(ValueError, match="nothing to guide"):
        draw(tmp_path / "x", labels="none", guidance=1.0)
    with pytest.raises(ValueError, match="classes in 0..2"):
        draw(tmp_path / "x", labels=(3,))
    with pytest.raises(app.UsageError, match="--labels='seven'"):
        run_main(f"--workdir={guided_workdir}", "--labels=seven")
    # A model trained without label dropout refuses guidance (here: an unconditional one) ...
    with pytest.raises(ValueError, match="needs class labels"):
        run_main(f"--workdir={workdir}", f"--out={tmp_path / 'x'}", "--guidance=1")
    # ... and a class-conditional one without the "no class" row, at the sampler.
    del config.model["p_uncond"]
    params = dict(params, class_embed={"embedding": params["class_embed"]["embedding"][:3]})
    with pytest.raises(ValueError, match="trained with label dropout"):
        draw(tmp_path / "x", guidance=1.0)
    assert not (tmp_path / "x").exists()
