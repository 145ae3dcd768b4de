"""What the command-line programs share: errors a user can fix end the program with one message.

``python -m ddpm_jax.train / sample / evaluate`` run through ``run``: a ValueError,
FileNotFoundError, FileExistsError, ImportError, FloatingPointError or CheckpointSaveError (bad
input, a missing or damaged file, a missing package, a diverged run, a failed save) prints
``<program>: error: <message>`` as the last line and exits with status 1, without a traceback;
``DDPM_JAX_TRACEBACK=1`` shows it. An error whose class sets ``exit_status`` exits with that
status instead (the trainer's non-finite loss: ``training.NonFiniteLossError.exit_status``, 3,
"do not requeue").
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from absl import app

from ddpm_jax.checkpointing import CheckpointSaveError

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, ImportError, FloatingPointError,
               CheckpointSaveError)


def _innermost_message(error: BaseException) -> str:
    """ml_collections wraps a KeyError's message in an AttributeError: unwrap to the text."""
    while error.args and isinstance(error.args[0], BaseException):
        error = error.args[0]
    return error.args[0] if len(error.args) == 1 and isinstance(error.args[0], str) else str(error)


def run(main: Callable[[list[str]], None], program: str) -> None:
    """``absl.app.run(main)`` with user errors reported in one line (see the module docstring).

    A ``--config.<field>`` override naming no field fails while flags are parsed, in
    ml_collections, with an AttributeError/KeyError that absl does not report as a flag error:
    it gets the same one-line treatment."""
    started = False

    def fail(message: str, status: int = 1) -> None:
        sys.stderr.flush()
        print(f"{program}: error: {message}", file=sys.stderr, flush=True)
        sys.exit(status)

    def guarded(argv: list[str]) -> None:
        nonlocal started
        started = True
        try:
            main(argv)
        except USER_ERRORS as e:
            if os.environ.get("DDPM_JAX_TRACEBACK"):
                raise
            fail(str(e), getattr(e, "exit_status", 1))

    try:
        app.run(guarded)
    except (AttributeError, KeyError) as e:
        if started or os.environ.get("DDPM_JAX_TRACEBACK"):
            raise
        fail(f"a --config override names no config field: {_innermost_message(e)}")
