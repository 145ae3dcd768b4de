"""TensorBoard event files: scalars and image grids, written by process 0 only.

Shared by the trainer and ``python -m ddpm_jax.evaluate``. Written with TensorFlow's core
``tf.summary.write`` and the plugin metadata that TensorBoard's scalar and image dashboards read,
so the ``tensorboard`` package is needed only to view them.
"""

from __future__ import annotations

import jax
import numpy as np

from ddpm_jax.checkpointing import PathLike


class SummaryWriter:
    """Scalars and PNG images into an event file under ``logdir`` (a no-op on processes > 0)."""

    def __init__(self, logdir: PathLike):
        self._writer = None
        if jax.process_index() == 0:
            import tensorflow as tf  # already a dependency of the input pipeline
            from tensorflow.core.framework import summary_pb2

            def metadata(plugin: str, data_class: int) -> summary_pb2.SummaryMetadata:
                return summary_pb2.SummaryMetadata(
                    plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name=plugin),
                    data_class=data_class,
                )

            self._tf = tf
            self._scalar_metadata = metadata("scalars", summary_pb2.DATA_CLASS_SCALAR)
            self._image_metadata = metadata("images", summary_pb2.DATA_CLASS_BLOB_SEQUENCE)
            self._writer = tf.summary.create_file_writer(str(logdir))

    def scalars(self, step: int, scalars: dict[str, float]) -> None:
        if self._writer is None:
            return
        with self._writer.as_default():
            for name, value in scalars.items():
                tensor = self._tf.constant(value, self._tf.float32)
                self._tf.summary.write(name, tensor, step=step, metadata=self._scalar_metadata)
        self._writer.flush()

    def image(self, step: int, name: str, grid: np.ndarray) -> None:
        """One uint8 [H, W, C] image, PNG-encoded as TensorBoard's image plugin stores it."""
        if self._writer is None:
            return
        height, width = grid.shape[:2]
        png = self._tf.io.encode_png(grid)
        tensor = self._tf.stack([str(width), str(height), png])
        with self._writer.as_default():
            self._tf.summary.write(name, tensor, step=step, metadata=self._image_metadata)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
