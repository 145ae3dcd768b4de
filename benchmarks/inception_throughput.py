"""Throughput of FID feature extraction: the FID Inception-v3 on uint8 images of a given size.

    python benchmarks/inception_throughput.py --image_size=32 --batch_size=200
    python benchmarks/inception_throughput.py --inception_weights=inception_fid.npz

Runs what `python -m ddpm_jax.evaluate` runs per feature batch (the sharded `FeatureExtractor`:
resize to 299 under the `tf` convention, the network in float32 at HIGHEST matmul precision,
features fetched to the host) on random uint8 images. Without --inception_weights the weights
are random (the speed does not depend on their values). Times --batches batches after a warm-up
one and prints the device, JAX version, compile + first batch time, and images/s.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import traverse_util

from ddpm_jax import evaluation, parallel
from ddpm_jax.metrics import inception

_IMAGE_SIZE = flags.DEFINE_integer("image_size", 32, "Side of the square input images.")
_BATCH = flags.DEFINE_integer("batch_size", 200, "Global feature batch (multiple of devices).")
_BATCHES = flags.DEFINE_integer("batches", 5, "Timed batches.")
_WEIGHTS = flags.DEFINE_string("inception_weights", None, "Real weights (default: random).")
_CPU_DEVICES = flags.DEFINE_integer(
    "cpu_devices", -1, "CPU backend only: devices to split the CPU into (-1 one per core)."
)


def _random_variables() -> dict:
    shapes = jax.eval_shape(inception.FIDInceptionV3().init, jax.random.key(0),
                            jnp.zeros((1, inception.INPUT_SIZE, inception.INPUT_SIZE, 3)))
    rng = np.random.default_rng(0)
    flat = {path: (rng.uniform(0.5, 1.5, s.shape) if path[-1] == "var"
                   else 0.05 * rng.standard_normal(s.shape)).astype(np.float32)
            for path, s in traverse_util.flatten_dict(shapes).items()}
    return traverse_util.unflatten_dict(flat)


def main(argv: list[str]) -> None:
    del argv
    parallel.split_cpu_into_devices(_BATCH.value, _CPU_DEVICES.value)
    mesh = parallel.make_data_mesh()
    variables = inception.load_variables(_WEIGHTS.value) if _WEIGHTS.value else _random_variables()
    extractor = evaluation.inception_extractor(variables, "tf", mesh, _BATCH.value)
    size = _IMAGE_SIZE.value
    images = np.random.default_rng(1).integers(0, 256, (_BATCH.value, size, size, 3), np.uint8)
    start = time.perf_counter()
    extractor(images)
    first_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(_BATCHES.value):
        extractor(images)  # returns NumPy: the device work is done
    elapsed = time.perf_counter() - start
    print(f"device:        {jax.device_count()} x {jax.devices()[0].device_kind} "
          f"({jax.default_backend()}), {jax.process_count()} process(es)")
    print(f"jax:           {jax.__version__}")
    print(f"input:         {size}x{size}x3 uint8 -> 299x299 (tf convention), batch {_BATCH.value}, "
          f"{'given' if _WEIGHTS.value else 'random'} weights")
    print(f"compile+first: {first_s:.1f} s")
    print(f"images/s:      {_BATCHES.value * _BATCH.value / elapsed:.1f}")


if __name__ == "__main__":
    app.run(main)
