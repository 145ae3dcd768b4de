"""Time of one train step's random draws under each PRNG implementation (config.train.prng_impl).

    python benchmarks/prng_draws.py --config=configs/cifar10.py --rounds=5

Draws what ``training.make_train_step`` draws per step, in one jitted function per implementation:
t ~ U{0..T-1} [B], ε ~ N(0, I) [B, H, W, C] and one dropout mask per dropout call of the model
(shapes read from the config's model at its batch; 0 with model.dropout = 0), each mask summed so
that every bit is drawn. The implementations run interleaved, ``--rounds`` times each; prints
the median seconds and the 32-bit words drawn.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from ddpm_jax import keys
from ddpm_jax.models import unet_from_config

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file to measure.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Timed calls per implementation (interleaved).")


def dropout_shapes(config) -> list[tuple[int, ...]]:
    """The mask shape of every dropout call of one training forward pass at the config's batch."""
    model = unet_from_config(config.model, config.data.num_channels)
    size, batch = config.data.image_size, config.data.batch_size
    x = jnp.zeros((batch, size, size, config.data.num_channels))
    t = jnp.zeros((batch,), jnp.int32)
    y = jnp.zeros((batch,), jnp.int32) if config.model.get("num_classes") else None
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), x[:1], t[:1], y=y, train=False))
    shapes, bernoulli = [], jax.random.bernoulli

    def recording(key, p=0.5, shape=None, **kwargs):
        shapes.append(tuple(shape))
        return bernoulli(key, p, shape, **kwargs)

    jax.random.bernoulli = recording
    try:
        jax.eval_shape(lambda p: model.apply(p, x, t, y=y, train=True,
                                             rngs={"dropout": jax.random.key(0)}), params)
    finally:
        jax.random.bernoulli = bernoulli
    return shapes


def main(argv: list[str]) -> None:
    del argv
    config = _CONFIG.value
    batch, size, channels = (config.data.batch_size, config.data.image_size,
                             config.data.num_channels)
    shapes = dropout_shapes(config) if config.model.dropout > 0 else []
    keep = 1.0 - config.model.dropout

    def draws(key: jax.Array) -> jax.Array:
        step_rng = jax.random.fold_in(key, 7)
        t_rng, noise_rng, dropout_rng = jax.random.split(step_rng, 3)
        t = jax.random.randint(t_rng, (batch,), 0, config.diffusion.num_timesteps)
        noise = jax.random.normal(noise_rng, (batch, size, size, channels))
        total = jnp.sum(t).astype(jnp.float32) + jnp.sum(noise)
        for i, shape in enumerate(shapes):
            mask = jax.random.bernoulli(jax.random.fold_in(dropout_rng, i), keep, shape)
            total += jnp.sum(mask, dtype=jnp.float32)
        return total

    words = batch + batch * size * size * channels + sum(int(np.prod(s)) for s in shapes)
    compiled = {}
    for impl in keys.IMPLS:
        key = keys.stream(0, keys.TRAIN, impl)
        compiled[impl] = (jax.jit(draws).lower(key).compile(), key)
        jax.block_until_ready(compiled[impl][0](key))
    times = {impl: [] for impl in keys.IMPLS}
    for _ in range(_ROUNDS.value):
        for impl, (fn, key) in compiled.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(key))
            times[impl].append(time.perf_counter() - start)
    print(f"device: {jax.device_count()} x {jax.devices()[0].device_kind}, jax {jax.__version__}")
    print(f"config: {config_flags.get_config_filename(flags.FLAGS['config'])}, batch {batch}: "
          f"{len(shapes)} dropout masks, {words / 1e6:.1f}M 32-bit words per step")
    for impl, ts in times.items():
        print(f"{impl:13s} median {statistics.median(ts):.3f} s (min {min(ts):.3f}, "
              f"max {max(ts):.3f}, {len(ts)} calls)")


if __name__ == "__main__":
    app.run(main)
