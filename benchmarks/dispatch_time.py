"""Host time of one train-step dispatch of a config, to choose ``config.train.steps_per_dispatch``.

    python benchmarks/dispatch_time.py --config=configs/cifar10.py --devices=8 --k=1,50

Runs the trainer's own jitted, sharded ``multi_step`` (``training.make_jitted_training``) over
``--devices`` fake CPU devices, one image per device (``--image_size``, default 16, with the
attention resolutions scaled alike: the UNet's parameters depend on neither, so the state is the
config's own, checked), and times the Python call until it returns (the host's share: argument
checks, sharding and donation of every leaf, launch), with its inputs ready and the previous
dispatch finished, median and min of ``--repeats``. First, free of any computation (and of the
train step's long CPU compile, which ``--null_only`` skips), the same arguments go through a
jitted no-op (outputs alias the donated inputs), timed until its results are ready. Also times
``training._global_batches`` of one step of the config's real batch (the per-step copy to the
devices, which K does not amortise). Prints leaves, times and, for the ``--step_ms`` device step
times given, the host share ``dispatch / (K * step)`` per K.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file to measure.")
_DEVICES = flags.DEFINE_integer("devices", 8, "Fake CPU devices (the mesh's size).")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 16, "Image size of the timed dispatches.")
_K = flags.DEFINE_list("k", ["1"], "Steps per dispatch to time (one compile each).")
_REPEATS = flags.DEFINE_integer("repeats", 15, "Timed dispatches per K.")
_NULL_ONLY = flags.DEFINE_bool("null_only", False, "Time only the no-op program (no compile of "
                                "the train step: seconds instead of minutes).")
_STEP_MS = flags.DEFINE_list("step_ms", ["2", "21"], "Device step times (ms) to compare with.")


def _median_s(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str]) -> None:
    del argv
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_backend_optimization_level=0"
                               f" --xla_force_host_platform_device_count={_DEVICES.value}")
    import jax  # after XLA_FLAGS
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from ddpm_jax import keys, parallel, training

    config = _CONFIG.value
    if config is None:
        raise app.UsageError("Pass --config=configs/<name>.py.")
    full_batch, full_size = config.data.batch_size, config.data.image_size
    mesh = parallel.make_data_mesh()
    rng = keys.stream(0, keys.TRAIN, keys.train_impl(config))
    own = jax.eval_shape(training.make_jitted_training(config, mesh)[2], rng)
    scale = full_size // _IMAGE_SIZE.value  # attention stays at the same levels
    with config.unlocked():
        config.data.batch_size = mesh.size
        config.data.image_size = _IMAGE_SIZE.value
        config.model.attn_resolutions = tuple(r // scale for r in config.model.attn_resolutions)
        config.optim.clip_groups = 1  # no collectives but the mean: the same state
    _, _, init, multi_step = training.make_jitted_training(config, mesh)
    state = init(rng)
    same = jax.tree.map(lambda a, b: a.shape == b.shape, own, jax.eval_shape(init, rng))
    assert all(jax.tree.leaves(same)), "the state depends on the image size"
    replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P(None, "data"))
    acc = jax.device_put(training.zero_metrics(), replicated)
    channels = config.data.num_channels
    print(f"device:   {jax.device_count()} x {jax.devices()[0].device_kind} "
          f"({jax.default_backend()}), jax {jax.__version__}")
    print(f"config:   {config_flags.get_config_filename(flags.FLAGS['config'])}: state "
          f"{len(jax.tree.leaves(state))} leaves, "
          f"{sum(x.size for x in jax.tree.leaves(state.params)) / 1e6:.1f}M params")

    # The same arguments through a program that does nothing (outputs alias the donated inputs).
    null_step = jax.jit(lambda s, a, b: (s, a), in_shardings=(replicated, replicated, split),
                        out_shardings=(replicated, replicated), donate_argnums=(0, 1))
    for k in [int(v) for v in _K.value]:
        batches = {"image": jax.device_put(
            np.zeros((k, mesh.size, _IMAGE_SIZE.value, _IMAGE_SIZE.value, channels), np.float32),
            split)}
        if config.model.get("num_classes"):
            batches["label"] = jax.device_put(np.zeros((k, mesh.size), np.int32), split)
        null = []
        null_compiled = null_step.lower(state, acc, batches).compile()
        for _ in range(_REPEATS.value + 1):
            start = time.perf_counter()
            state, acc = null_compiled(state, acc, batches)
            jax.block_until_ready((state, acc))
            null.append(time.perf_counter() - start)
        print(f"K={k}:      no-op program with the same arguments, call to ready: "
              f"{statistics.median(null[1:]) * 1e3:.2f} ms (min {min(null[1:]) * 1e3:.2f})")
        if _NULL_ONLY.value:
            continue
        compiled = multi_step.lower(state, acc, batches).compile()
        times = []
        for _ in range(_REPEATS.value + 1):
            jax.block_until_ready((state, acc))
            start = time.perf_counter()
            state, acc = compiled(state, acc, batches)
            times.append(time.perf_counter() - start)
        jax.block_until_ready((state, acc))
        dispatch = statistics.median(times[1:])
        shares = ", ".join(f"{dispatch / (k * float(ms) * 1e-3):.1%} of {k} x {ms} ms"
                           for ms in _STEP_MS.value)
        print(f"K={k}:      dispatch {dispatch * 1e3:.2f} ms (median of {_REPEATS.value}; "
              f"min {min(times[1:]) * 1e3:.2f}, max {max(times[1:]) * 1e3:.2f}); {shares}")

    local = np.zeros((full_batch, full_size, full_size, channels), np.float32)
    data = iter(lambda: {"image": local}, None)
    copy = _median_s(lambda: jax.block_until_ready(
        training._global_batches(data, 1, split, full_batch)), _REPEATS.value)
    print(f"batch:    one step's batch ({full_batch}x{full_size}x{full_size}x{channels} float32) "
          f"to the devices: {copy * 1e3:.2f} ms per step (median of {_REPEATS.value})")
    sys.stdout.flush()


if __name__ == "__main__":
    app.run(main)
