"""The training program: end to end, sharding, recompiles, resume, signals, NaN stop, refusal.

In-process tests use the 8 fake CPU devices of conftest.py. The `slow` tests run the real
command (`python -m ddpm_jax.train`) in subprocesses on 2 fake devices, sharing one persistent
XLA compilation cache so only the first of them compiles.
"""

import importlib.util
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P
from PIL import Image

from ddpm_jax import checkpointing, diffusion, training
from ddpm_jax.models import unet_from_config

ROOT = Path(__file__).resolve().parents[1]
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def load_config(name: str) -> ml_collections.ConfigDict:
    path = ROOT / "configs" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"configs.{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def tiny_config(**train) -> ml_collections.ConfigDict:
    config = load_config("tiny")
    config.train.update(train)
    return config


class _StepLog(logging.Handler):
    """Records each console 'step k/N' line with the number of XLA compilations so far."""

    def __init__(self, compiles: list) -> None:
        super().__init__(logging.INFO)
        self.compiles = compiles
        self.lines: list[tuple[str, int]] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("step "):
            self.lines.append((message, len(self.compiles)))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One full train_and_evaluate of the tiny config (4 steps, log every step)."""
    workdir = tmp_path_factory.mktemp("tiny_run")
    compiles: list[str] = []

    def on_event(event: str, duration: float, **kwargs) -> None:
        if event == BACKEND_COMPILE_EVENT:
            compiles.append(kwargs.get("fun_name", "?"))

    jax.monitoring.register_event_duration_secs_listener(on_event)
    handler = _StepLog(compiles)
    absl_logger = logging.getLogger("absl")
    old_level = absl_logger.level
    absl_logger.setLevel(logging.INFO)
    absl_logger.addHandler(handler)
    try:
        config = tiny_config(num_steps=4, log_every=1, checkpoint_every=4, sample_every=4)
        state = training.train_and_evaluate(config, workdir)
    finally:
        absl_logger.removeHandler(handler)
        absl_logger.setLevel(old_level)
        jax.monitoring.unregister_event_duration_listener(on_event)
    return workdir, state, handler.lines, config


def test_train_and_evaluate_end_to_end(tiny_run):
    workdir, state, lines, config = tiny_run
    assert int(state.step) == 4
    assert [line.split()[1] for line, _ in lines] == ["1/4", "2/4", "3/4", "4/4"]
    for line, _ in lines:
        loss = float(re.search(r"loss (\S+)", line).group(1))
        assert np.isfinite(loss) and 0.0 < loss < 10.0
        assert "steps/s" in line and "images/s" in line and "ETA" in line
    # EMA and params differ after training, and both are finite.
    leaves = zip(jax.tree.leaves(state.params), jax.tree.leaves(state.ema_params), strict=True)
    assert any(not np.array_equal(p, e) for p, e in leaves)
    assert checkpointing.read_config(workdir).to_dict() == config.to_dict()
    assert '"device_count": 8' in (workdir / "mesh.json").read_text()
    assert list((workdir / "checkpoints").iterdir()) == [workdir / "checkpoints" / "4"]
    assert list(workdir.glob("events.out.tfevents.*"))
    grid = np.asarray(Image.open(workdir / "samples" / "00000004.png"))
    # 8 images of 16x16 in a 3x3 grid with 2-pixel gaps.
    assert grid.shape == (3 * 18 + 2, 3 * 18 + 2) and grid.dtype == np.uint8
    ema, _, step = checkpointing.load_ema_params(workdir)
    assert step == 4
    for saved, live in zip(jax.tree.leaves(ema), jax.tree.leaves(state.ema_params), strict=True):
        np.testing.assert_array_equal(saved, np.asarray(live))


def test_no_recompilation_after_the_first_step(tiny_run):
    _, _, lines, _ = tiny_run
    compiles_at_log = [count for _, count in lines]
    assert compiles_at_log[0] > 0
    assert compiles_at_log == [compiles_at_log[0]] * 4, lines


def test_refuses_a_workdir_with_an_incompatible_config(tiny_run):
    workdir = tiny_run[0]
    before = (workdir / "config.json").read_text()
    config = tiny_config()
    config.model.ch = 64
    with pytest.raises(ValueError, match=r"(?s)incompatible config.*model\.ch: 32 \(saved\)"):
        training.train_and_evaluate(config, workdir)
    assert (workdir / "config.json").read_text() == before
    assert [p.name for p in (workdir / "checkpoints").iterdir()] == ["4"]


def test_sharded_loss_equals_single_device_loss():
    config = tiny_config()
    model = unet_from_config(config.model, config.data.num_channels)
    tx = training.make_optimizer(config.optim)
    sched = diffusion.schedule_from_config(config.diffusion)
    step_fn = training.make_train_step(config, model, tx, sched)
    state = training.create_train_state(config, model, tx, jax.random.PRNGKey(0))
    state = state.replace(step=jnp.asarray(3, jnp.int32))  # non-zero lr
    images = np.random.default_rng(0).uniform(-1, 1, (8, 16, 16, 1)).astype(np.float32)

    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    assert mesh.size == 8
    sharded = jax.jit(
        step_fn,
        in_shardings=(NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))),
        out_shardings=NamedSharding(mesh, P()),
    )
    single = jax.jit(step_fn)
    one_device = SingleDeviceSharding(jax.devices()[0])
    state_1 = jax.device_put(state, one_device)
    batch_1 = {"image": jax.device_put(images, one_device)}
    new_1, metrics_1 = single(state_1, batch_1)
    new_8, metrics_8 = sharded(state, {"image": images})
    assert len(metrics_8["loss"].sharding.device_set) == 8

    np.testing.assert_allclose(metrics_8["loss"], metrics_1["loss"], rtol=1e-5)
    np.testing.assert_allclose(metrics_8["grad_norm"], metrics_1["grad_norm"], rtol=1e-4)
    np.testing.assert_array_equal(metrics_8["loss_by_t_count"], metrics_1["loss_by_t_count"])
    np.testing.assert_allclose(
        metrics_8["loss_by_t_sum"].sum(), metrics_1["loss"] * 8, rtol=1e-5
    )
    for a, b in zip(jax.tree.leaves(new_8.params), jax.tree.leaves(new_1.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    # lr 0 at step 1 (warm-up), then 5e29: the params of step 2 overflow the forward of step 3.
    config = tiny_config(num_steps=4, log_every=10, checkpoint_every=1, sample_every=0)
    config.optim.lr = 1e30
    config.optim.warmup_steps = 2
    with pytest.raises(training.NonFiniteLossError, match=r"Non-finite loss .*at step 3"):
        training.train_and_evaluate(config, tmp_path)
    ckpt_dir = tmp_path / "checkpoints"
    assert sorted(int(p.name) for p in ckpt_dir.iterdir()) == [1, 2]
    ema, _, step = checkpointing.load_ema_params(tmp_path)
    assert step == 2 and all(np.all(np.isfinite(x)) for x in jax.tree.leaves(ema))


@pytest.mark.parametrize("num_classes, class_conditional", [(10, False), (None, True)])
def test_refuses_disagreeing_class_conditioning_fields(tmp_path, num_classes, class_conditional):
    config = tiny_config()
    config.model.num_classes = num_classes
    config.data.class_conditional = class_conditional
    message = r"num_classes=.* and config\.data\.class_conditional=.* disagree"
    with pytest.raises(ValueError, match=message):
        training.train_and_evaluate(config, tmp_path)
    assert not any(tmp_path.iterdir())


# ----------------------------------------------------------------------------------------------
# The real command, in subprocesses.
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def subprocess_env(tmp_path_factory, repo_env):
    env = dict(repo_env)
    env.update(
        # conftest.py's XLA flags (e.g. the fast-compile level), but 2 fake devices.
        XLA_FLAGS=re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                         env.get("XLA_FLAGS", "")) + " --xla_force_host_platform_device_count=2",
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("xla_cache")),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    )
    return env


def _train_command(workdir: Path, *overrides: str, config: str = "tiny") -> list[str]:
    return [
        sys.executable, "-m", "ddpm_jax.train",
        f"--config={ROOT / 'configs' / f'{config}.py'}", f"--workdir={workdir}", *overrides,
    ]


def _run(command: list[str], env: dict, cwd: Path = ROOT) -> str:
    result = subprocess.run(
        command, env=env, cwd=cwd, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr


def _final_state(workdir: Path, step: int) -> training.TrainState:
    config = checkpointing.read_config(workdir)
    model = unet_from_config(config.model, config.data.num_channels)
    tx = training.make_optimizer(config.optim)
    abstract = jax.eval_shape(
        lambda: training.create_train_state(config, model, tx, jax.random.PRNGKey(0))
    )
    device = SingleDeviceSharding(jax.devices()[0])
    template = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
                            abstract)
    with checkpointing.Checkpointer(workdir) as ckpt:
        return ckpt.restore(template, step)


@pytest.mark.slow
def test_killed_and_resumed_run_is_bit_identical(tmp_path, subprocess_env):
    n = 3
    overrides = (f"--config.train.num_steps={2 * n}", f"--config.train.checkpoint_every={n}",
                 "--config.train.log_every=1", "--config.train.sample_every=0")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    # The uninterrupted run and the run to be killed go side by side (compilation is one thread).
    straight_log = tmp_path / "straight.log"
    uninterrupted = subprocess.Popen(
        _train_command(straight, *overrides), env=subprocess_env, cwd=ROOT,
        stdout=subprocess.DEVNULL, stderr=straight_log.open("w"),
    )
    process = subprocess.Popen(
        _train_command(resumed, *overrides), env=subprocess_env, cwd=ROOT,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while not (resumed / "checkpoints" / str(n)).exists():  # appears when finalized
        assert process.poll() is None and time.time() < deadline, "no checkpoint at step n"
        time.sleep(0.02)
    assert process.poll() is None, "the run finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (resumed / "checkpoints" / str(2 * n)).exists()
    assert uninterrupted.wait(timeout=300) == 0, straight_log.read_text()[-3000:]

    log = _run(_train_command(resumed, *overrides), subprocess_env)
    assert f"Resumed from the checkpoint at step {n}" in log
    a, b = _final_state(straight, 2 * n), _final_state(resumed, 2 * n)
    assert int(a.step) == int(b.step) == 2 * n
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path, subprocess_env):
    process = subprocess.Popen(
        _train_command(tmp_path, "--config.train.num_steps=100000",
                       "--config.train.log_every=1", "--config.train.sample_every=0"),
        env=subprocess_env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True,
    )
    log = []
    for line in process.stderr:  # wait until training is under way
        log.append(line)
        if "step 2/100000" in line:
            break
    process.send_signal(signal.SIGTERM)
    _, rest = process.communicate(timeout=120)
    log = "".join(log) + rest
    assert process.returncode == 0, log[-3000:]
    steps = [int(p.name) for p in (tmp_path / "checkpoints").iterdir()]
    assert len(steps) == 1 and steps[0] >= 2
    assert f"Stopped at step {steps[0]} and saved its checkpoint" in log


@pytest.mark.slow
def test_non_finite_loss_exits_with_the_do_not_requeue_status(tmp_path, subprocess_env):
    """The command's exit status 3 (launchers: do not requeue), one line, checkpoint 2 resumable.
    lr 0 at step 1 (warm-up), then 5e29: the params of step 2 overflow the forward of step 3."""
    result = subprocess.run(
        _train_command(tmp_path, "--config.train.num_steps=4", "--config.train.log_every=4",
                       "--config.train.checkpoint_every=1", "--config.train.sample_every=0",
                       "--config.optim.lr=1e30", "--config.optim.warmup_steps=2"),
        env=subprocess_env, cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == training.NonFiniteLossError.exit_status == 3, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ddpm_jax.train: error: Non-finite loss or params at step 3"), last
    assert "Traceback" not in result.stderr
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [1, 2]
    state = _final_state(tmp_path, 2)
    assert int(state.step) == 2
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state))


@pytest.mark.slow
def test_default_command_runs_from_any_directory(tmp_path, subprocess_env):
    """`python -m ddpm_jax.train` with no --config/--workdir (a few steps, a small grid), its
    offline dataset built into the ``data_dir`` given on the command line."""
    data_dir = tmp_path / "tfds"
    overrides = ["--config.train.num_steps=2", "--config.train.log_every=1",
                 "--config.sample.num_images=4", "--config.sample.num_steps=3",
                 f"--config.data.data_dir={data_dir}"]
    env = dict(subprocess_env)  # the CPU as it is: no fake device count
    env["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env["XLA_FLAGS"])
    _run([sys.executable, "-m", "ddpm_jax.train", *overrides], env, cwd=tmp_path)
    workdir = tmp_path / "runs" / "mnist5k"
    # One CPU device per core (as many as divide the batch of 32).
    cores = len(os.sched_getaffinity(0))
    expected = max(d for d in range(1, cores + 1) if 32 % d == 0)
    assert json.loads((workdir / "mesh.json").read_text())["device_count"] == expected
    config = checkpointing.read_config(workdir)
    assert config.data.dataset == "mnist5k" and config.data.image_size == 28
    assert config.data.data_dir == str(data_dir) and (data_dir / "mnist5k").is_dir()
    assert (workdir / "checkpoints" / "2").is_dir()
    grid = np.asarray(Image.open(workdir / "samples" / "00000002.png"))
    assert grid.shape == (2 * 30 + 2, 2 * 30 + 2)


# ----------------------------------------------------------------------------------------------
# The trainer review (issue 14): stops, the original's clipping, checks at start, one compile.
# ----------------------------------------------------------------------------------------------
def test_a_stop_in_the_last_interval_still_writes_the_final_checkpoint(tmp_path, monkeypatch):
    """The stop request is seen at step 2 = num_steps, a log step: the checkpoint is written."""
    monkeypatch.setattr(training._StopRequest, "should_stop", lambda self, step, k, log: step >= 2)
    config = tiny_config(num_steps=2, log_every=2, checkpoint_every=2, sample_every=2)
    state = training.train_and_evaluate(config, tmp_path)
    assert int(state.step) == 2
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["2"]


def test_a_stop_between_log_steps_saves_that_step(tmp_path, monkeypatch):
    monkeypatch.setattr(training._StopRequest, "should_stop", lambda self, step, k, log: step >= 3)
    config = tiny_config(num_steps=8, log_every=4, checkpoint_every=8, sample_every=0)
    training.train_and_evaluate(config, tmp_path)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["3"]


@pytest.mark.parametrize("override, message", [
    (dict(sample=dict(sampler="ddpm", eta=0.5)), "config.sample: eta=0.5 is invalid"),
    (dict(model=dict(dtype="float16")), "use bfloat16"),
    (dict(train=dict(steps_per_dispatch=3, log_every=4)), "must divide config.train.num_steps=4"),
    (dict(optim=dict(clip_groups=3)), "clip_groups=3 must be >= 1 and divide"),
    (dict(data=dict(batch_size=24), optim=dict(clip_groups=12)),
     "clip_groups=12 must be 1, a multiple or a divisor of the device count (8)"),
    (dict(train=dict(prng_impl="philox")),
     "config.train.prng_impl='philox' is not one of threefry2x32, rbg, unsafe_rbg."),
    (dict(sample=dict(guidance=1.0, guidance_interval=(500, 1000))),
     "config.sample: guidance_interval=(500, 1000)"),
])
def test_bad_settings_fail_at_start_before_anything_is_written(tmp_path, override, message):
    config = tiny_config()
    config.optim.clip_groups = 1
    for section, fields in override.items():
        config[section].update(fields)
    with pytest.raises(ValueError, match=re.escape(message)):
        training.train_and_evaluate(config, tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def test_several_steps_per_dispatch_compile_the_step_once(tmp_path):
    compiled = []

    def on_event(event: str, duration: float, **kwargs) -> None:
        if event == BACKEND_COMPILE_EVENT and "multi_step" in kwargs.get("fun_name", ""):
            compiled.append(kwargs["fun_name"])

    jax.monitoring.register_event_duration_secs_listener(on_event)
    try:
        config = tiny_config(num_steps=8, log_every=4, checkpoint_every=8, sample_every=0,
                             steps_per_dispatch=2)
        assert int(training.train_and_evaluate(config, tmp_path).step) == 8
    finally:
        jax.monitoring.unregister_event_duration_listener(on_event)
    assert len(compiled) == 1, compiled


def test_several_steps_per_dispatch_stop_at_exact_steps(tmp_path, monkeypatch):
    """K = 4: logs, checkpoints, grids and evaluations at exactly their multiples of K."""
    evaluated, logged = [], []
    monkeypatch.setattr(training.evaluation, "make_training_evaluator", lambda *a: object())
    monkeypatch.setattr(training, "_evaluate_and_log",
                        lambda ev, params, step, *a: evaluated.append(step))
    monkeypatch.setattr(training.summary.SummaryWriter, "scalars",
                        lambda self, step, scalars: logged.append(step))
    config = tiny_config(num_steps=16, log_every=8, checkpoint_every=12, sample_every=4,
                         steps_per_dispatch=4, keep_checkpoints=None)
    config.eval.every_steps = 8
    assert int(training.train_and_evaluate(config, tmp_path).step) == 16
    assert logged == [8, 16]
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [12, 16]
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == [
        f"{s:08d}.png" for s in (4, 8, 12, 16)]
    assert evaluated == [8, 16]


def test_a_sigterm_during_a_dispatch_saves_at_its_end_step(tmp_path, monkeypatch):
    """The signal arrives while the second dispatch (steps 5..8) is under way: checkpoint 8."""
    calls, global_batches = [], training._global_batches

    def signalling(*args, **kwargs):
        calls.append(1)
        batches = global_batches(*args, **kwargs)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return batches

    monkeypatch.setattr(training, "_global_batches", signalling)
    config = tiny_config(num_steps=16, log_every=16, checkpoint_every=16, sample_every=0,
                         steps_per_dispatch=4)
    assert int(training.train_and_evaluate(config, tmp_path).step) == 8
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["8"]


def test_group_clipping_is_the_per_group_computation():
    """clip_groups=G: each group's mean-loss gradient clipped to grad_clip, then averaged,
    computed here group by group in float64 with the same keys."""
    config = tiny_config()
    model = unet_from_config(config.model, config.data.num_channels)
    sched = diffusion.schedule_from_config(config.diffusion)
    params = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 1)), jnp.zeros((1,), jnp.int32),
                        train=False)["params"]
    rng = np.random.default_rng(0)
    x0 = jnp.asarray(rng.uniform(-1, 1, (8, 16, 16, 1)), jnp.float32)
    t = jnp.asarray(rng.integers(0, 1000, 8), jnp.int32)
    noise = jnp.asarray(rng.standard_normal((8, 16, 16, 1)), jnp.float32)
    dropout_rng = jax.random.key(1)

    def loss_fn(params, x0, t, noise, y, key):
        def model_fn(x, t):
            return model.apply({"params": params}, x, t, train=True, rngs={"dropout": key})

        losses = diffusion.training_losses(sched, model_fn, x0, t, noise)
        return jnp.mean(losses), losses

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    clip, groups = 0.05, 4
    grads, losses, mean_norm = training._group_clipped_grads(
        grad_fn, params, (x0, t, noise, None), dropout_rng, groups, clip)

    keys = jax.random.split(dropout_rng, groups)
    expected, norms, all_losses = None, [], []
    for g in range(groups):
        part = slice(2 * g, 2 * g + 2)
        (_, group_losses), g_grads = grad_fn(params, x0[part], t[part], noise[part], None, keys[g])
        leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(g_grads)]
        norm = np.sqrt(sum(np.sum(x**2) for x in leaves))
        scaled = [x * min(1.0, clip / norm) / groups for x in leaves]
        if expected is not None:
            scaled = [a + b for a, b in zip(expected, scaled, strict=True)]
        expected = scaled
        norms.append(norm)
        all_losses.append(np.asarray(group_losses))
    assert max(norms) > clip  # the clipping is exercised
    for got, want in zip(jax.tree.leaves(grads), expected, strict=True):
        np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4, atol=1e-9)
    np.testing.assert_allclose(np.asarray(losses), np.concatenate(all_losses), rtol=1e-5)
    np.testing.assert_allclose(float(mean_norm), np.mean(norms), rtol=1e-4)


def test_optimizer_state_has_one_structure_whatever_the_clipping():
    params = {"w": jnp.zeros((3,))}
    structures = set()
    for grad_clip, groups in ((0.0, 1), (1.0, 1), (1.0, 8)):
        optim = tiny_config().optim
        optim.grad_clip, optim.clip_groups = grad_clip, groups
        structures.add(jax.tree.structure(training.make_optimizer(optim).init(params)))
    assert len(structures) == 1


# ----------------------------------------------------------------------------------------------
# Label dropout for classifier-free guidance (config.model.p_uncond).
# ----------------------------------------------------------------------------------------------
def guided_tiny_config(p_uncond: float, **train) -> ml_collections.ConfigDict:
    config = tiny_config(**train)
    config.data.class_conditional = True
    config.model.num_classes = 10
    config.model.p_uncond = p_uncond
    return config


def test_label_dropout_rate_is_the_configured_one(monkeypatch):
    n, p = 200_000, 0.1
    y = jnp.arange(n, dtype=jnp.int32) % 10
    dropped = training.drop_labels(jax.random.key(0), y, p, 10)
    rate = float(jnp.mean(dropped == 10))
    assert abs(rate - p) < 5 * np.sqrt(p * (1 - p) / n)
    kept = dropped != 10
    np.testing.assert_array_equal(dropped[kept], y[kept])
    # The train step drops with the config's rate and the "no class" label num_classes.
    seen = []
    monkeypatch.setattr(training, "drop_labels",
                        lambda rng, y, p_uncond, null: seen.append((p_uncond, null)) or y)
    config = guided_tiny_config(0.25)
    model = unet_from_config(config.model, config.data.num_channels)
    tx = training.make_optimizer(config.optim)
    sched = diffusion.schedule_from_config(config.diffusion)
    state = training.create_train_state(config, model, tx, jax.random.key(0))
    assert state.params["class_embed"]["embedding"].shape[0] == 11  # K + 1 rows: ∅ is row K
    batch = {"image": jnp.zeros((8, 16, 16, 1)), "label": jnp.zeros((8,), jnp.int32)}
    jax.eval_shape(training.make_train_step(config, model, tx, sched), state, batch)
    assert seen == [(0.25, 10)]


def test_no_label_dropout_keeps_todays_parameter_shapes():
    config = guided_tiny_config(0.0)
    model = unet_from_config(config.model, config.data.num_channels)
    shapes = jax.eval_shape(lambda: training.create_train_state(
        config, model, training.make_optimizer(config.optim), jax.random.key(0)))
    assert shapes.params["class_embed"]["embedding"].shape[0] == 10


def test_resumed_run_with_label_dropout_is_bit_identical(tmp_path):
    """In process: 4 steps straight, and 2 steps then a resume from that checkpoint to 4."""
    kw = dict(log_every=2, checkpoint_every=2, sample_every=0)
    straight = training.train_and_evaluate(guided_tiny_config(0.5, num_steps=4, **kw),
                                           tmp_path / "straight")
    training.train_and_evaluate(guided_tiny_config(0.5, num_steps=2, **kw), tmp_path / "resumed")
    resumed = training.train_and_evaluate(guided_tiny_config(0.5, num_steps=4, **kw),
                                          tmp_path / "resumed")
    assert int(straight.step) == int(resumed.step) == 4
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    # The dropout is on: the same run without it ends elsewhere.
    plain = training.train_and_evaluate(guided_tiny_config(0.0, num_steps=4, **kw),
                                        tmp_path / "plain")
    assert not np.array_equal(np.asarray(plain.params["conv_out"]["kernel"]),
                              np.asarray(straight.params["conv_out"]["kernel"]))
