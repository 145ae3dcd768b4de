"""The user cache of ddpm_jax: reference statistics, the digits classifier, compiled programs.

``$DDPM_JAX_CACHE``, else ``$XDG_CACHE_HOME/ddpm_jax``, else ``~/.cache/ddpm_jax``.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
from absl import logging


def root() -> Path:
    """The cache directory (see the module docstring); it may not exist yet."""
    if os.environ.get("DDPM_JAX_CACHE"):
        return Path(os.environ["DDPM_JAX_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ddpm_jax"


def enable_compilation_cache() -> None:
    """Keeps compiled XLA programs on disk (JAX's persistent compilation cache), so that a resumed
    run, a sampling or an evaluation run loads the compiled model instead of compiling it again.

    In ``$JAX_COMPILATION_CACHE_DIR`` when set (JAX reads it itself; set it to a shared path on a
    cluster), else in ``<cache root>/xla``. Call before the first compilation.
    """
    if jax.config.jax_compilation_cache_dir:
        return
    directory = root() / "xla"
    jax.config.update("jax_compilation_cache_dir", str(directory))
    logging.info("Compiled programs are cached in %s.", directory)
