"""TFDS datasets that build with no network.

Importing this package registers `mnist5k` with TFDS, so `tfds.load("mnist5k")` works like any
catalog dataset, and provides `folder_builder` for `dataset="folder:/path"`.
"""

from ddpm_jax.datasets.image_folder import FolderImages, folder_builder
from ddpm_jax.datasets.mnist5k import Mnist5k

__all__ = ["FolderImages", "Mnist5k", "folder_builder"]
