"""What a user sees when a command gets wrong input: the last line says what was wrong and how to
fix it, and no traceback (ddpm_jax.cli)."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent


def run(env, *args, cwd=REPO):
    result = subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=300)
    return result.returncode, result.stderr


@pytest.fixture(scope="module")
def corrupt_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(10):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    (folder / "bad.png").write_bytes(b"not a png")
    return folder


@pytest.mark.parametrize("args, message", [
    (["ddpm_jax.train", "--config=nope"],
     "'nope' is neither a file nor the name of a shipped config"),
    (["ddpm_jax.train", "--config=tiny", "--config.optim.lrr=1"],
     "ddpm_jax.train: error: a --config override names no config field: 'lrr'"),
    (["ddpm_jax.train", "--config=tiny", "--config.train.num_steps=abc"],
     "flag --config.train.num_steps=abc: invalid literal for int()"),
    (["ddpm_jax.train", "--config=tiny", "--config.data.batch_size=12", "--workdir={tmp}/run"],
     "ddpm_jax.train: error: config.data.batch_size=12 must be a positive multiple of the number "
     "of devices (8)"),
    (["ddpm_jax.train", "--config=tiny", "--config.sample.sampler=ddpm",
      "--config.sample.eta=0.5", "--workdir={tmp}/run"],
     "ddpm_jax.train: error: config.sample: eta=0.5 is invalid for sampler 'ddpm'"),
    (["ddpm_jax.train", "--config=tiny", "--config.data.dataset=folder:{images}",
      "--config.data.num_channels=3", "--workdir={tmp}/run", "--config.data.data_dir={tmp}/tfds"],
     "ddpm_jax.train: error: Cannot read image {images}/bad.png"),
    (["ddpm_jax.sample", "--workdir={tmp}/missing"],
     "ddpm_jax.sample: error: Checkpoint path {tmp}/missing does not exist."),
    (["ddpm_jax.sample", "--workdir={tmp}", "--sampler=bogus"],
     "flag --sampler=bogus: value should be one of <ddpm|ddim|dpm++|dpm++sde>"),
    (["ddpm_jax.evaluate", "--workdir={tmp}", "--metrics=fid,foo"],
     "ddpm_jax.evaluate: error: Unknown metrics ['foo']: choose from fid, is, kid, digits, bpd."),
    (["ddpm_jax.evaluate", "--samples={tmp}/none.npz", "--metrics=digits"],
     "ddpm_jax.evaluate: error: --samples={tmp}/none.npz does not exist."),
    # Issue 22's three: a TensorFlow traceback, a run of gradient ascent, a pickle hint.
    (["ddpm_jax.train", "--config=tiny", "--config.data.image_size=0", "--workdir={tmp}/run"],
     "ddpm_jax.train: error: config.data.image_size=0 is not an integer >= 1. It is the side of "
     "the square training images, in pixels. Set it, e.g. --config.data.image_size=32 (the "
     "default)."),
    (["ddpm_jax.train", "--config=tiny", "--config.optim.lr=-1", "--workdir={tmp}/run"],
     "ddpm_jax.train: error: config.optim.lr=-1.0 is not a number > 0. It is Adam's peak "
     "learning rate. Set it, e.g. --config.optim.lr=0.0002 (the default)."),
    (["ddpm_jax.evaluate", "--samples={tmp}/bad.npz", "--metrics=is"],
     "ddpm_jax.evaluate: error: {tmp}/bad.npz is not a readable samples .npz: it is a text file. "
     "Expected an .npz archive (np.savez) with 'arr_0': uint8 [N, H, W, C] images"),
])
def test_wrong_input_ends_with_one_clear_line(args, message, tmp_path, corrupt_folder, repo_env):
    fill = dict(tmp=tmp_path, images=corrupt_folder)
    (tmp_path / "bad.npz").write_text("not an archive\n")
    before = sorted(tmp_path.iterdir())
    code, stderr = run(repo_env, *(a.format(**fill) for a in args))
    assert code != 0
    assert "Traceback" not in stderr, stderr[-3000:]
    tail = "\n".join(stderr.strip().splitlines()[-3:])
    assert message.format(**fill) in tail, tail
    assert sorted(tmp_path.iterdir()) == before  # nothing written: no workdir, no results
