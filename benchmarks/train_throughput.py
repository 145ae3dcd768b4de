"""Throughput of the jitted train step of a config, on synthetic data.

    python benchmarks/train_throughput.py --config=configs/cifar10.py
    python benchmarks/train_throughput.py --config=configs/mnist5k.py --steps=20

Runs exactly what `python -m ddpm_jax.train` runs per dispatch (the same jitted, sharded
`multi_step`, K = config.train.steps_per_dispatch steps each) on random batches already on the
devices, so data loading is excluded. Times `--steps` dispatches after `--warmup` ones, with
`block_until_ready`, and prints the device, JAX version, config, compile time, steps/s, images/s.
"""

from __future__ import annotations

import time

import jax
from absl import app, flags
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from ml_collections import config_flags

from ddpm_jax import keys, parallel, training

import synthetic  # benchmarks/synthetic.py, beside this script

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file to benchmark.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed dispatches.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed dispatches after compilation.")
_CPU_DEVICES = flags.DEFINE_integer(
    "cpu_devices", -1, "CPU backend only: devices to split the CPU into, as ddpm_jax.train does "
    "(-1 one per core, 0 JAX's default)."
)


def main(argv: list[str]) -> None:
    del argv
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("Pass --config=configs/<name>.py.")
    parallel.split_cpu_into_devices(config.data.batch_size, _CPU_DEVICES.value)
    mesh = parallel.make_data_mesh()
    _, _, init, multi_step = training.make_jitted_training(config, mesh)
    k = config.train.steps_per_dispatch
    batch = config.data.batch_size
    size, channels = config.data.image_size, config.data.num_channels
    rng = keys.stream(0, keys.TRAIN, keys.train_impl(config))
    batches = synthetic.train_batches(config, mesh, rng)

    state = init(rng)
    num_params = sum(x.size for x in jax.tree.leaves(state.params))
    acc = jax.device_put(training.zero_metrics(), NamedSharding(mesh, P()))
    start = time.perf_counter()
    compiled = multi_step.lower(state, acc, batches).compile()
    compile_s = time.perf_counter() - start
    for _ in range(_WARMUP.value):
        state, acc = compiled(state, acc, batches)
    jax.block_until_ready((state, acc))
    start = time.perf_counter()
    for _ in range(_STEPS.value):
        state, acc = compiled(state, acc, batches)
    jax.block_until_ready((state, acc))
    elapsed = time.perf_counter() - start
    steps_per_sec = _STEPS.value * k / elapsed
    config_name = config_flags.get_config_filename(flags.FLAGS["config"])
    print(f"device:        {jax.device_count()} x {jax.devices()[0].device_kind} "
          f"({jax.default_backend()}), {jax.process_count()} process(es)")
    print(f"jax:           {jax.__version__}")
    print(f"config:        {config_name} (batch {batch}, {size}x{size}x{channels}, "
          f"{num_params / 1e6:.2f}M params, dtype {config.model.dtype}, {k} step(s)/dispatch)")
    print(f"compile:       {compile_s:.1f} s")
    print(f"steps/s:       {steps_per_sec:.3f}")
    print(f"images/s:      {steps_per_sec * batch:.1f}")


if __name__ == "__main__":
    app.run(main)
