"""The random key streams of a run: one per purpose, derived from a seed, never shared.

Keys are typed (``jax.random.key``). A training state stores its key as raw key data
(``jax.random.key_data``: ``uint32[2]`` for threefry2x32, ``uint32[4]`` for rbg and unsafe_rbg),
which is what checkpoints hold; the training stream's implementation is
``config.train.prng_impl`` (``train_impl``), every other stream's is threefry2x32. For
threefry2x32, ``fold_in(k, i)`` equals ``split(k)[i]``, so the purposes below are constants far
from the small indices that ``split`` uses: the sample program's chunk 0 never reuses the
training init key.
"""

from __future__ import annotations

import jax
import ml_collections

TRAIN = 0  # split(root) -> (init, train): the training state's init key and its step stream
GRID = 0x5A  # the trainer's sample grids: the same noise at every grid
EVAL = 0xE7A1  # the trainer's periodic evaluation: the same samples' noise at every evaluation
SAMPLE = 0x5A3E  # python -m ddpm_jax.sample / evaluate: chunk c uses fold_in(stream, c)


# jax.random.key_impl names. Runs whose config predates config.train.prng_impl used the first.
IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")


def stream(seed: int, purpose: int, impl: str = IMPLS[0]) -> jax.Array:
    """The typed key of ``purpose`` (one of the constants above) for ``seed``."""
    root = jax.random.key(seed, impl=impl)
    return root if purpose == TRAIN else jax.random.fold_in(root, purpose)


def train_impl(config: ml_collections.ConfigDict) -> str:
    """The PRNG implementation of a training run's key (``config.train.prng_impl``, one of
    ``IMPLS``: checked at start by ``config_checks``)."""
    return config.train.get("prng_impl", IMPLS[0])
