"""Random training batches shaped and split as the trainer's, for the benchmark scripts
(train_throughput.py, diffusers_side_by_side.py): one dispatch's worth, already on the devices,
so the input pipeline is excluded from the timings."""

from __future__ import annotations

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


def train_batches(
    config: ml_collections.ConfigDict, mesh: Mesh, rng: jax.Array
) -> dict[str, jax.Array]:
    """{"image": float32 [K, B, H, W, C] uniform in [-1, 1], "label": int32 [K, B] for a
    class-conditional model}, K = config.train.steps_per_dispatch, B split over 'data': what
    ``multi_step`` of ``training.make_jitted_training`` takes."""
    k, batch = config.train.steps_per_dispatch, config.data.batch_size
    size, channels = config.data.image_size, config.data.num_channels
    sharding = NamedSharding(mesh, P(None, "data"))
    batches = {
        "image": jax.device_put(
            jax.random.uniform(rng, (k, batch, size, size, channels), minval=-1.0, maxval=1.0),
            sharding,
        )
    }
    if config.model.get("num_classes"):
        labels = np.arange(k * batch, dtype=np.int32).reshape(k, batch) % config.model.num_classes
        batches["label"] = jax.device_put(labels, sharding)
    return batches
