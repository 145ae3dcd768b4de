"""The random key streams of a run: one per purpose, derived from a seed, never shared.

Keys are typed (``jax.random.key``). A training state stores its key as raw ``uint32[2]`` data
(``jax.random.key_data``), which is what checkpoints hold. For the default PRNG,
``fold_in(k, i)`` equals ``split(k)[i]``, so the purposes below are constants far from the small
indices that ``split`` uses: the sample program's chunk 0 never reuses the training init key.
"""

from __future__ import annotations

import jax

TRAIN = 0  # split(root) -> (init, train): the training state's init key and its step stream
GRID = 0x5A  # the trainer's sample grids: the same noise at every grid
EVAL = 0xE7A1  # the trainer's periodic evaluation: the same samples' noise at every evaluation
SAMPLE = 0x5A3E  # python -m ddpm_jax.sample / evaluate: chunk c uses fold_in(stream, c)


def stream(seed: int, purpose: int) -> jax.Array:
    """The typed key of ``purpose`` (one of the constants above) for ``seed``."""
    root = jax.random.key(seed)
    return root if purpose == TRAIN else jax.random.fold_in(root, purpose)
