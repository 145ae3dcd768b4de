"""The shipped training configs: one ml_collections ``get_config()`` file per experiment.

Each starts from ``_default.py`` (every field, with the paper's CIFAR-10 values) and overrides what
differs; files whose names start with ``_`` are such shared bases, not configs to run.
``python -m ddpm_jax.train --config=NAME[:argument]`` runs the config named NAME.
"""

from pathlib import Path

DIRECTORY = Path(__file__).resolve().parent


def names() -> list[str]:
    """The shipped configs: ``celebahq256``, ``cifar10``, ..."""
    return sorted(path.stem for path in DIRECTORY.glob("*.py") if not path.stem.startswith("_"))


def resolve(value: str) -> str:
    """A ``--config`` value as the file path that ml_collections loads: an existing file as it is,
    a shipped config's name as that config's file; both keep an ``:argument`` for ``get_config``
    (``mnist5k:unconditional``)."""
    path, colon, argument = value.partition(":")
    if Path(path).is_file():
        return value
    if path in names():
        return f"{DIRECTORY / path}.py{colon}{argument}"
    raise ValueError(
        f"{path!r} is neither a file nor the name of a shipped config ({', '.join(names())}). "
        "Pass a shipped config by name (--config=cifar10) or a config file's path."
    )
