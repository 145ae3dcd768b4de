"""The DDPM training library: train state, the sharded train step, and the training loop.

One linear trainer (``train_and_evaluate``) around a pure ``train_step``:

* Parallelism: ``jax.jit`` over a 1-D ('data',) ``Mesh`` of every device of every process; the
  state is replicated, the global batch is split along its batch axis, the state is donated.
* Objective: L_simple (Ho et al. 2020, eq. 14), t ~ U{0..T-1}, ε ~ N(0, I); the keys for t, ε,
  dropout and label dropout are ``fold_in(state.rng, step)``, so a run is a pure function of
  (config, step). With ``config.model.p_uncond`` > 0 each label is replaced by the "no class"
  label K with that probability (classifier-free guidance, Ho & Salimans 2022, Alg. 1).
* Optimizer: Adam with linear warm-up and global-norm clipping; an fp32 EMA of the params is kept
  in the state and is what sampling and evaluation use. ``config.model.dtype`` sets the compute
  dtype only: params, optimizer state, EMA and loss stay float32.
* Metrics are accumulated on device and fetched once per log interval (no per-step host sync).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ddpm_jax import (
    checkpointing,
    config_checks,
    diffusion,
    evaluation,
    generation,
    images,
    keys,
    parallel,
    sampler_spec,
    summary,
)
from ddpm_jax.models import unet_from_config

PyTree = Any
Metrics = dict[str, jax.Array]
NUM_T_BINS = 4  # the loss is also reported per quarter of the t range
_FAST_COMPILE = {"xla_backend_optimization_level": 0}


# ----------------------------------------------------------------------------------------------
# State, optimizer, schedule.
# ----------------------------------------------------------------------------------------------
@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue, all arrays (what a checkpoint holds)."""

    step: jax.Array  # int32 []: number of updates done
    params: PyTree  # float32
    ema_params: PyTree  # float32, decay config.train.ema_decay
    opt_state: optax.OptState
    rng: jax.Array  # uint32[2] (threefry2x32) or [4] (rbg), the run's key data: step s uses
    # fold_in(key, s); its implementation is config.train.prng_impl (keys.train_impl)


def learning_rate_schedule(optim_config: ml_collections.ConfigDict) -> optax.Schedule:
    """lr · min(step / warmup_steps, 1), as in the original code (constant without warm-up)."""
    if optim_config.warmup_steps > 0:
        return optax.linear_schedule(0.0, optim_config.lr, optim_config.warmup_steps)
    return optax.constant_schedule(optim_config.lr)


def make_optimizer(optim_config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Global-norm clipping, then Adam on the warmed-up learning rate.

    The state has the same structure whatever ``grad_clip`` and ``clip_groups`` are (so a run
    may change them on resume): with no clipping, or with clipping per group done by the train
    step (``clip_groups`` > 1), the clip here has an infinite threshold.
    """
    adam = optax.adam(
        learning_rate_schedule(optim_config),
        b1=optim_config.b1,
        b2=optim_config.b2,
        eps=optim_config.eps,
    )
    clip = optim_config.grad_clip or 0.0
    if clip <= 0 or optim_config.get("clip_groups", 1) > 1:
        clip = math.inf
    return optax.chain(optax.clip_by_global_norm(clip), adam)


def create_train_state(
    config: ml_collections.ConfigDict,
    model: Any,
    tx: optax.GradientTransformation,
    rng: jax.Array,
) -> TrainState:
    """Fresh params (EMA = params), optimizer state, step 0, from a key of the config's PRNG
    implementation (typed, e.g. ``keys.stream(seed, keys.TRAIN, keys.train_impl(config))``, or
    its raw data). Pure and jittable."""
    impl = keys.train_impl(config)
    if not jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
        rng = jax.random.wrap_key_data(rng, impl=impl)
    elif str(jax.random.key_impl(rng)) != impl:
        raise ValueError(f"A {jax.random.key_impl(rng)} key for a run whose "
                         f"config.train.prng_impl is {impl!r}.")
    init_rng, train_rng = jax.random.split(rng)
    size, channels = config.data.image_size, config.data.num_channels
    x = jnp.zeros((1, size, size, channels), jnp.float32)
    t = jnp.zeros((1,), jnp.int32)
    y = jnp.zeros((1,), jnp.int32) if config.model.get("num_classes") else None
    params = model.init({"params": init_rng}, x, t, y=y, train=False)["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema_params=params,
        opt_state=tx.init(params),
        rng=jax.random.key_data(train_rng),
    )


# ----------------------------------------------------------------------------------------------
# The train step.
# ----------------------------------------------------------------------------------------------
def _clip(grads: PyTree, grad_clip: float) -> tuple[PyTree, jax.Array]:
    """(grads scaled to global norm at most ``grad_clip`` (no clipping when <= 0), their norm)."""
    norm = optax.tree.norm(grads)
    if not grad_clip or grad_clip <= 0:
        return grads, norm
    scale = jnp.minimum(1.0, grad_clip / norm)
    return jax.tree.map(lambda g: g * scale, grads), norm


def _group_clipped_grads(
    grad_fn: Callable[..., tuple[tuple[jax.Array, jax.Array], PyTree]],
    params: PyTree,
    batch: tuple[jax.Array | None, ...],
    dropout_rng: jax.Array,
    groups: int,
    grad_clip: float,
    mesh: Mesh | None = None,
) -> tuple[PyTree, jax.Array, jax.Array]:
    """The original code's clipping (diffusion_tf/tpu_utils: ``CrossShardOptimizer`` with
    ``grad_clip / num_replicas``): the batch is split into ``groups`` consecutive groups, each
    group's mean-loss gradient is clipped to global norm ``grad_clip``, and the clipped gradients
    are averaged. Returns (gradient, per-example losses [B], mean of the groups' norms before
    clipping). The original's logged ``gnorm`` is one group's norm / groups.

    As in the original, each device clips the gradients of its own share of the batch (no
    per-group gradient is ever batched, which would turn weight-gradient convolutions into
    batch-grouped ones): ``mesh`` is the ('data',) mesh the batch is split over (None: one device).
    With D devices and groups = k·D, each device runs its k groups one after the other (group i
    of device d has dropout key ``split(dropout_rng, groups)[d·k + i]``); with D = m·groups, a
    group spans m consecutive devices, whose local gradients are averaged over the group before
    its clip (member j of group g: dropout key ``fold_in(split(dropout_rng, groups)[g], j)``).
    Then one mean over the devices, the same all-reduce as without groups.
    """
    devices = 1 if mesh is None else mesh.size
    config_checks.check_clip_groups(groups, batch[0].shape[0], devices)
    members = max(1, devices // groups)  # devices per group
    local_groups = max(1, groups // devices)  # groups per device
    axes = ("group", "member")
    platform = jax.default_backend() if mesh is None else mesh.devices.flat[0].platform
    on_cpu = platform == "cpu"

    def clip_local_groups(params: PyTree, batch: tuple[jax.Array | None, ...], keys: jax.Array):
        """This device's groups (keys [local_groups]): (sum of their clipped gradients, sum of
        their norms, per-example losses)."""
        split = [None if a is None else a.reshape(local_groups, -1, *a.shape[1:]) for a in batch]

        def clip_group(total: PyTree, group: tuple) -> tuple[PyTree, tuple[jax.Array, jax.Array]]:
            *inputs, key = group
            if members > 1:
                key = jax.random.fold_in(key, jax.lax.axis_index("member"))
            (_, losses), grads = grad_fn(params, *inputs, key)
            if members > 1:  # the group's mean-loss gradient
                grads = jax.lax.pmean(grads, "member")
            clipped, norm = _clip(grads, grad_clip)
            return jax.tree.map(jnp.add, total, clipped), (losses, norm)

        zeros = jax.tree.map(jnp.zeros_like, params)
        # A loop (one copy of the backward pass to compile), unrolled for one group and on
        # XLA:CPU, which ran the loop about 10x slower (benchmarks/RESULTS.md).
        total, (losses, norms) = jax.lax.scan(
            clip_group, zeros, (*split, keys), unroll=True if on_cpu or local_groups == 1 else 1
        )
        return total, jnp.sum(norms), losses.reshape(-1)

    keys = jax.random.split(dropout_rng, groups)
    if mesh is None:
        total, norm_sum, losses = clip_local_groups(params, batch, keys)
    else:
        def per_device(params, batch, keys):
            total, norm_sum, losses = clip_local_groups(params, batch, keys)
            return jax.lax.pmean((total, norm_sum), axes), losses

        group_mesh = Mesh(mesh.devices.reshape(-1, members), axes)  # the same devices, in order
        (total, norm_sum), losses = jax.shard_map(
            per_device, mesh=group_mesh, in_specs=(P(), P(axes), P("group")),
            out_specs=(P(), P(axes)),
            # The gradients stay per device (no implicit psum of the replicated params' cotangent).
            check_vma=False,
        )(params, batch, keys)
    grads = jax.tree.map(lambda g: g / local_groups, total)
    return grads, losses, norm_sum / local_groups


def drop_labels(rng: jax.Array, y: jax.Array, p_uncond: float, null_label: int) -> jax.Array:
    """Label dropout for classifier-free guidance (Ho & Salimans 2022, Alg. 1): each label becomes
    ``null_label`` (the "no class" ∅) independently with probability ``p_uncond``."""
    drop = jax.random.bernoulli(rng, p_uncond, y.shape)
    return jnp.where(drop, jnp.asarray(null_label, y.dtype), y)


def make_train_step(
    config: ml_collections.ConfigDict,
    model: Any,
    tx: optax.GradientTransformation,
    sched: diffusion.Schedule,
    mesh: Mesh | None = None,
) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, Metrics]]:
    """``train_step(state, batch) -> (state, metrics)``: one Adam step on L_simple, then the EMA.

    ``mesh``: the ('data',) mesh the batch is split over (None: one device), where each device
    clips its own groups' gradients when ``config.optim.clip_groups`` > 1.
    ``batch`` is {"image": float32 [B, H, W, C] in [-1, 1], "label": int32 [B] (optional)}.
    ``metrics``: loss (batch mean), grad_norm (before clipping; with ``config.optim.clip_groups``
    > 1 the mean of the groups' norms), gnorm (grad_norm / clip_groups: the ``train/gnorm`` that
    the original code logged), lr, and the sum and count of the
    per-example losses whose t falls in each quarter of 0..T-1 (``loss_by_t_sum/count`` [4]).
    """
    num_timesteps = sched.num_timesteps
    clip_groups = config.optim.get("clip_groups", 1)
    lr_fn = learning_rate_schedule(config.optim)
    decay = config.train.ema_decay
    mean_type = config.diffusion.mean_type
    p_uncond = config.model.get("p_uncond", 0.0)
    null_label = config.model.get("num_classes")
    impl = keys.train_impl(config)

    def train_step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, Metrics]:
        x0, y = batch["image"], batch.get("label")
        step_rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng, impl=impl), state.step)
        t_rng, noise_rng, dropout_rng = jax.random.split(step_rng, 3)
        if p_uncond > 0 and y is not None:  # its own stream: t, ε and dropout stay as without
            y = drop_labels(jax.random.fold_in(step_rng, 3), y, p_uncond, null_label)
        t = jax.random.randint(t_rng, x0.shape[:1], 0, num_timesteps, dtype=jnp.int32)
        noise = jax.random.normal(noise_rng, x0.shape, jnp.float32)

        def loss_fn(params: PyTree, x0, t, noise, y, dropout_rng) -> tuple[jax.Array, jax.Array]:
            def model_fn(x_t: jax.Array, t: jax.Array) -> jax.Array:
                return model.apply(
                    {"params": params}, x_t, t, y=y, train=True, rngs={"dropout": dropout_rng}
                )

            losses = diffusion.training_losses(sched, model_fn, x0, t, noise, mean_type=mean_type)
            return jnp.mean(losses), losses

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        if clip_groups == 1:  # the optimizer clips the whole batch's gradient
            (loss, losses), grads = grad_fn(state.params, x0, t, noise, y, dropout_rng)
            grad_norm = optax.tree.norm(grads)
        else:
            grads, losses, grad_norm = _group_clipped_grads(
                grad_fn, state.params, (x0, t, noise, y), dropout_rng, clip_groups,
                config.optim.grad_clip, mesh,
            )
            loss = jnp.mean(losses)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema_params = jax.tree.map(
            lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params
        )
        t_bin = jax.nn.one_hot(t * NUM_T_BINS // num_timesteps, NUM_T_BINS, dtype=jnp.float32)
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "gnorm": grad_norm / clip_groups,
            "lr": jnp.asarray(lr_fn(state.step), jnp.float32),
            "loss_by_t_sum": jnp.sum(t_bin * losses[:, None], axis=0),
            "loss_by_t_count": jnp.sum(t_bin, axis=0),
        }
        new_state = state.replace(
            step=state.step + 1, params=params, ema_params=ema_params, opt_state=opt_state
        )
        return new_state, metrics

    return train_step


# ----------------------------------------------------------------------------------------------
# Metrics accumulated on device between two log lines.
# ----------------------------------------------------------------------------------------------
_NO_BAD_STEP = np.iinfo(np.int32).max


def zero_metrics() -> Metrics:
    return {
        "steps": jnp.zeros((), jnp.int32),
        "loss": jnp.zeros((), jnp.float32),
        "grad_norm": jnp.zeros((), jnp.float32),
        "gnorm": jnp.zeros((), jnp.float32),
        "lr": jnp.zeros((), jnp.float32),
        "loss_by_t_sum": jnp.zeros((NUM_T_BINS,), jnp.float32),
        "loss_by_t_count": jnp.zeros((NUM_T_BINS,), jnp.float32),
        "first_nonfinite_step": jnp.asarray(_NO_BAD_STEP, jnp.int32),
    }


def accumulate_metrics(acc: Metrics, metrics: Metrics, step: jax.Array) -> Metrics:
    """Adds one step's metrics (``step`` = the step count after it) to the running sums."""
    bad = ~jnp.isfinite(metrics["loss"])
    return {
        "steps": acc["steps"] + 1,
        "loss": acc["loss"] + metrics["loss"],
        "grad_norm": acc["grad_norm"] + metrics["grad_norm"],
        "gnorm": acc["gnorm"] + metrics["gnorm"],
        "lr": metrics["lr"],
        "loss_by_t_sum": acc["loss_by_t_sum"] + metrics["loss_by_t_sum"],
        "loss_by_t_count": acc["loss_by_t_count"] + metrics["loss_by_t_count"],
        "first_nonfinite_step": jnp.where(
            bad, jnp.minimum(acc["first_nonfinite_step"], step), acc["first_nonfinite_step"]
        ),
    }


def summarize_metrics(acc: dict[str, np.ndarray]) -> dict[str, float]:
    """Interval means of the fetched sums: loss, grad_norm, gnorm, lr (last), loss_t_q{0..3}."""
    steps = max(int(acc["steps"]), 1)
    out = {
        "loss": float(acc["loss"]) / steps,
        "grad_norm": float(acc["grad_norm"]) / steps,
        "gnorm": float(acc["gnorm"]) / steps,
        "lr": float(acc["lr"]),
    }
    for q in range(NUM_T_BINS):
        if acc["loss_by_t_count"][q] > 0:
            out[f"loss_t_q{q}"] = float(acc["loss_by_t_sum"][q] / acc["loss_by_t_count"][q])
    return out


def make_multi_step(
    train_step: Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, Metrics]],
) -> Callable[[TrainState, Metrics, dict[str, jax.Array]], tuple[TrainState, Metrics]]:
    """``(state, acc, batches [K, B, ...]) -> (state, acc)``: K train steps in one lax.scan."""

    def multi_step(
        state: TrainState, acc: Metrics, batches: dict[str, jax.Array]
    ) -> tuple[TrainState, Metrics]:
        def body(carry: tuple[TrainState, Metrics], batch: dict[str, jax.Array]):
            state, acc = carry
            state, metrics = train_step(state, batch)
            return (state, accumulate_metrics(acc, metrics, state.step)), None

        if jax.tree.leaves(batches)[0].shape[0] == 1:  # no loop: XLA:CPU runs loops slowly
            (state, acc), _ = body((state, acc), jax.tree.map(lambda x: x[0], batches))
            return state, acc
        (state, acc), _ = jax.lax.scan(body, (state, acc), batches)
        return state, acc

    return multi_step


# ----------------------------------------------------------------------------------------------
# Logging, signals, faults, layout.
# ----------------------------------------------------------------------------------------------
class NonFiniteLossError(FloatingPointError):
    """A non-finite loss or params: the run stops with its last good checkpoint intact.

    Rerunning the same command would resume from that checkpoint and diverge again at the same
    step (a run is a pure function of config and step), so ``python -m ddpm_jax.train`` exits
    with ``exit_status`` (3), which launchers read as "do not requeue" (launch/gpu_slurm.sh).
    3 is neither Python's or absl's error status (1) nor a usage error (2), a shell's (126, 127)
    or a signal's (128 + n).
    """

    exit_status = 3


class _StopRequest:
    """A request to save a checkpoint and stop (SIGTERM: preemption; Ctrl-C), checked every step.

    One process: SIGTERM and SIGINT set a flag. Several processes: SIGTERM stays JAX's own (its
    preemption notifier, installed by ``jax.distributed.initialize``, tells the coordination
    service, and ``reached_preemption_sync_point`` turns True on every process at the same step
    with no host sync of ours); SIGINT sets a flag that the processes compare at log steps.
    A second SIGINT falls through to Python's default (KeyboardInterrupt).
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        del frame
        self.requested = True
        name = signal.Signals(signum).name
        logging.warning("Received %s: saving a checkpoint and stopping.", name)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def __enter__(self) -> _StopRequest:
        if threading.current_thread() is threading.main_thread():
            signums = (signal.SIGTERM, signal.SIGINT) if jax.process_count() == 1 else (
                signal.SIGINT,)
            for signum in signums:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def should_stop(self, step: int, k: int, at_log_step: bool) -> bool:
        """Whether to stop after ``step``, which ended a dispatch of ``k`` steps; every process
        must call it after every dispatch and gets the same answer."""
        if jax.process_count() == 1:
            return self.requested
        # JAX's protocol names one step id as the safe one: ask about each step of the dispatch.
        if any([multihost_utils.reached_preemption_sync_point(s) for s in range(step - k + 1,
                                                                                  step + 1)]):
            logging.warning("Preemption notice: saving a checkpoint at step %d and stopping.", step)
            return True
        if not at_log_step:
            return False
        flags = multihost_utils.process_allgather(np.asarray(self.requested, np.int32))
        return bool(np.any(flags))


def mesh_layout(mesh: Mesh, config: ml_collections.ConfigDict) -> dict[str, Any]:
    devices = jax.devices()
    return {
        "platform": devices[0].platform,
        "device_kind": devices[0].device_kind,
        "process_count": jax.process_count(),
        "device_count": len(devices),
        "local_device_count": jax.local_device_count(),
        "mesh": dict(mesh.shape),
        "devices": [str(d) for d in mesh.devices.flat],
        "global_batch": config.data.batch_size,
        "per_device_batch": config.data.batch_size // mesh.size,
        "steps_per_dispatch": config.train.steps_per_dispatch,
    }


def _format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def grid_spec(config: ml_collections.ConfigDict) -> sampler_spec.SamplerSpec:
    """The sample grids' setting: config.sample, class k in column k of a class-conditional
    model's grid."""
    return sampler_spec.from_config(config, labels="grid")


# ----------------------------------------------------------------------------------------------
# The compiled pieces (shared with benchmarks/train_throughput.py).
# ----------------------------------------------------------------------------------------------
def make_jitted_training(config: ml_collections.ConfigDict, mesh: Mesh) -> tuple[
    Any,
    diffusion.Schedule,
    Callable[[jax.Array], TrainState],
    Callable[[TrainState, Metrics, dict[str, jax.Array]], tuple[TrainState, Metrics]],
]:
    """(model, schedule, init, multi_step) for ``mesh``: ``init(rng)`` makes the replicated
    TrainState; ``multi_step(state, acc, batches)`` runs K = batches' leading dim train steps on
    global [K, B, ...] batches split over 'data', donating the state and the metric sums."""
    replicated = NamedSharding(mesh, P())
    model = unet_from_config(config.model, config.data.num_channels)
    tx = make_optimizer(config.optim)
    sched = diffusion.schedule_from_config(config.diffusion)
    init = jax.jit(
        functools.partial(create_train_state, config, model, tx),
        out_shardings=replicated,
        # Runs once: on CPU, skip XLA's backend optimizations (compiles ~4x faster).
        compiler_options=_FAST_COMPILE if jax.default_backend() == "cpu" else None,
    )
    multi_step = jax.jit(
        make_multi_step(make_train_step(config, model, tx, sched, mesh)),
        in_shardings=(replicated, replicated, NamedSharding(mesh, P(None, "data"))),
        out_shardings=(replicated, replicated),
        donate_argnums=(0, 1),
    )
    return model, sched, init, multi_step


# ----------------------------------------------------------------------------------------------
# Evaluation during training.
# ----------------------------------------------------------------------------------------------
def _evaluate_and_log(
    evaluate: Callable[[PyTree, int], tuple[dict[str, float], evaluation.Protocol]],
    ema_params: PyTree,
    step: int,
    config: ml_collections.ConfigDict,
    workdir: checkpointing.PathLike,
    writer: summary.SummaryWriter,
) -> None:
    """config.eval's figures of the EMA params: console, TensorBoard, eval/<step>_<tag>.json, and
    workdir/best when the headline figure improved."""
    t0 = time.time()
    metrics, protocol = evaluate(ema_params, step)
    logging.info("Evaluation at step %d (%.0fs): %s", step, time.time() - t0,
                 evaluation.describe(metrics, protocol))
    writer.scalars(step, {f"eval/{k}": v for k, v in metrics.items()})
    evaluation.write_results(
        checkpointing.as_path(workdir) / "eval" / f"{step}_{protocol.tag()}.json",
        [(metrics, protocol)],
    )
    if config.eval.get("keep_best", True):
        name, lower = evaluation.HEADLINE[evaluation.parse_metrics(config.eval.metrics)[0]]
        params = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), ema_params)
        if checkpointing.update_best(workdir, step, params, config, name, metrics[name], lower):
            logging.info("New best %s %.4g at step %d: kept in %s/%s.", name, metrics[name], step,
                         workdir, checkpointing.BEST_DIR)


# ----------------------------------------------------------------------------------------------
# The training loop.
# ----------------------------------------------------------------------------------------------
def _global_batches(
    data: Iterator[dict[str, np.ndarray]], k: int, sharding: NamedSharding, global_batch: int
) -> dict[str, jax.Array]:
    """The next k per-process batches stacked to [k, B_local, ...], as global [k, B, ...] arrays."""
    local = [next(data) for _ in range(k)]
    out = {}
    for key in local[0]:
        stacked = np.stack([b[key] for b in local])
        global_shape = (k, global_batch, *stacked.shape[2:])
        out[key] = jax.make_array_from_process_local_data(sharding, stacked, global_shape)
    return out


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: checkpointing.PathLike
) -> TrainState:
    """Trains (or resumes) the run in ``workdir`` to ``config.train.num_steps``; returns the state.

    Writes workdir/config.json and mesh.json, TensorBoard events, samples/<step>.png grids of EMA
    samples, and checkpoints. Stops with NonFiniteLossError (a FloatingPointError) on a non-finite
    loss, once the last good checkpoint is on disk (no checkpoint of non-finite params is ever
    written); SIGTERM/SIGINT save a checkpoint and return.
    """
    workdir = checkpointing.as_path(workdir)
    train_config = config.train
    config_checks.check_config(config, "train", device_count=jax.device_count(),
                               process_count=jax.process_count())  # before anything is written
    from ddpm_jax import input_pipeline  # TensorFlow: only for a run that reads data

    input_pipeline.check_dataset(config.data)  # a bad dataset, split or image: before it too
    is_main = jax.process_index() == 0
    checkpointing.write_config(workdir, config)  # refuses an incompatible workdir
    mesh = parallel.make_data_mesh()
    replicated = NamedSharding(mesh, P())
    batch_sharding = NamedSharding(mesh, P(None, "data"))  # [K, B, ...]: split B
    layout = mesh_layout(mesh, config)
    if is_main:
        (workdir / "mesh.json").write_text(json.dumps(layout, indent=2) + "\n")
    logging.info("Devices and mesh: %s", layout)

    model, _, init, multi_step = make_jitted_training(config, mesh)
    new_metrics = jax.jit(zero_metrics, out_shardings=replicated)
    params_finite = jax.jit(
        lambda s: jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(s)]))
    )
    evaluate = evaluation.make_training_evaluator(config, model, mesh)  # checks config.eval
    grid_key = keys.stream(config.seed, keys.GRID)  # the same noise at every grid
    rng = keys.stream(config.seed, keys.TRAIN, keys.train_impl(config))
    abstract_state = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
        jax.eval_shape(init, rng),
    )
    if train_config.sample_every:  # compiled now: no compile, or error, in the middle of the run
        grid_fn = generation.make_generate_fn(
            model, config, mesh, grid_spec(config), batch_size=config.sample.num_images,
        ).lower(abstract_state.ema_params, grid_key, np.int32(0)).compile()

    ckpt = checkpointing.Checkpointer(
        workdir,
        max_to_keep=train_config.keep_checkpoints,
        keep_period=train_config.get("keep_period") or None,
        config=config,
    )
    num_steps = train_config.num_steps
    with ckpt, _StopRequest() as stop, contextlib.closing(summary.SummaryWriter(workdir)) as writer:
        step = ckpt.latest_step()
        if step is None:
            state, step = init(rng), 0
        else:
            state, step = ckpt.restore_latest(abstract_state)  # moves damaged ones aside
            logging.info("Resumed from the checkpoint at step %d in %s.", step, workdir)
        if step >= num_steps:
            logging.info("Step %d >= num_steps=%d: nothing to train.", step, num_steps)
            return state

        def check_finite(acc_host: dict[str, np.ndarray] | None = None) -> None:
            bad = _NO_BAD_STEP if acc_host is None else int(acc_host["first_nonfinite_step"])
            if bad == _NO_BAD_STEP and bool(params_finite((state.params, state.ema_params))):
                return
            ckpt.wait()
            where = f"at step {bad}" if bad != _NO_BAD_STEP else f"by step {step}"
            raise NonFiniteLossError(
                f"Non-finite loss or params {where}: training stopped. The last good checkpoint "
                f"(step {ckpt.latest_step()}) in {ckpt.directory} is intact; lower "
                "config.optim.lr or config.optim.grad_clip and resume from it."
            )

        def save_checkpoint() -> None:
            check_finite(jax.device_get(acc))
            ckpt.save(step, state, force=True)

        data = input_pipeline.create_dataset(config.data, seed=config.seed, start_step=step)
        acc = new_metrics()
        eval_every = config.eval.every_steps if evaluate is not None else 0
        boundaries = [train_config.log_every, train_config.checkpoint_every]
        boundaries += [b for b in (train_config.sample_every, eval_every) if b]
        t_mark, paused, steps_at_mark, first_dispatch = time.time(), 0.0, step, True
        stopping = False
        logging.info("Training from step %d to %d.", step, num_steps)
        while step < num_steps and not stopping:
            next_stop = min([num_steps] + [(step // b + 1) * b for b in boundaries])
            k = min(train_config.steps_per_dispatch, next_stop - step)
            batches = _global_batches(data, k, batch_sharding, config.data.batch_size)
            state, acc = multi_step(state, acc, batches)
            if first_dispatch:  # time the compilation apart from the steps/s
                jax.block_until_ready(state)
                logging.info("First step (compilation included) took %.1fs.", time.time() - t_mark)
                t_mark, steps_at_mark, first_dispatch = time.time(), step + k, False
            step += k
            at_end = step == num_steps
            at_log_step = step % train_config.log_every == 0 or at_end

            if at_log_step:
                acc_host = jax.device_get(acc)
                check_finite(acc_host)
                scalars = summarize_metrics(acc_host)
                elapsed = max(time.time() - t_mark - paused, 1e-9)
                steps_per_sec = (step - steps_at_mark) / elapsed
                scalars["steps_per_sec"] = steps_per_sec
                scalars["images_per_sec"] = steps_per_sec * config.data.batch_size
                if is_main:
                    logging.info(
                        "step %d/%d  loss %.5f  grad_norm %.3f  lr %.3g  %.2f steps/s  "
                        "%.1f images/s  ETA %s",
                        step, num_steps, scalars["loss"], scalars["grad_norm"], scalars["lr"],
                        steps_per_sec, scalars["images_per_sec"],
                        _format_duration(
                            (num_steps - step) / steps_per_sec if steps_per_sec else math.inf
                        ),
                    )
                writer.scalars(step, scalars)
                acc = new_metrics()
                t_mark, paused, steps_at_mark = time.time(), 0.0, step
            stopping = stop.should_stop(step, k, at_log_step)

            t_pause = time.time()
            if step % train_config.checkpoint_every == 0 or at_end or stopping:
                save_checkpoint()  # first: a stop or a preemption never loses this step
            if stopping:  # no grid or evaluation: a preempted job may have seconds left
                logging.info("Stopped at step %d and saved its checkpoint; rerun the same "
                             "command to resume.", step)
                break
            if train_config.sample_every and (step % train_config.sample_every == 0 or at_end):
                samples, _ = grid_fn(state.ema_params, grid_key, np.int32(0))
                grid = images.make_grid(multihost_utils.process_allgather(samples, tiled=True))
                if is_main:
                    images.write_png(workdir / "samples" / f"{step:08d}.png", grid)
                writer.image(step, "ema_samples", grid)
            if eval_every and (step % eval_every == 0 or at_end):
                _evaluate_and_log(evaluate, state.ema_params, step, config, workdir, writer)
            paused += time.time() - t_pause
    return state
