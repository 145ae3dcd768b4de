"""TFDS -> per-process batches of images in [-1, 1] for DDPM training.

Preprocessing follows Ho et al. (2020), Sec. 4 / Appendix B: uint8 pixels are scaled linearly to
[-1, 1]; larger images are center-cropped to a square and area-resized to `image_size` (rounded
back to 8 bits, so the data stay on the grid the discretized decoder of Eq. 13 assumes); random
horizontal flips when `random_flip` is set (CIFAR-10 in the paper).

Multi-host: each process reads a disjoint, equally sized part of the split
(`tfds.split_for_jax_process`) and yields its `batch_size // process_count` share of every global
batch; the trainer assembles the global `jax.Array` (`jax.make_array_from_process_local_data`).

Resuming needs no iterator state: the batch sequence is a pure function of (seed, process, step).
Data are read epoch by epoch; epoch e uses file and example shuffles seeded by
(seed, process, e); every epoch drops its remainder, so step s is batch s % steps_per_epoch of
epoch s // steps_per_epoch, and a resume skips the already-seen examples of that epoch before they
are decoded.
"""

import concurrent.futures
import difflib
import os
import re
import socket
from collections.abc import Callable, Iterator

import jax
import ml_collections
import numpy as np
import tensorflow as tf

try:  # tf.data only: keep TensorFlow off the accelerators that JAX uses.
    tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # TF's devices were already initialised by someone else; nothing to hide.
    pass

import tensorflow_datasets as tfds  # noqa: E402

from ddpm_jax import datasets, parallel  # noqa: E402  (datasets registers `mnist5k`)

FOLDER_PREFIX = "folder:"
OFFLINE_HINT = (
    "On a machine without network: set config.data.data_dir to a directory where the dataset is "
    "already prepared (run `tfds build NAME --data_dir=DIR` where there is network and copy DIR), "
    "or train on the bundled `mnist5k`, or on your own images with `folder:/path/to/images`."
)
_TOO_SMALL = "image smaller than image_size"
_PREFETCH_BATCHES = 4


def _network_available(host: str = "storage.googleapis.com", timeout: float = 3.0) -> bool:
    """Whether TFDS can reach the internet (behind a proxy, assume it can)."""
    proxies = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
    if any(os.environ.get(var) for var in proxies):
        return True
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def _prepare(builder: tfds.core.DatasetBuilder, name: str) -> None:
    """download_and_prepare, turning the failures users hit into instructions."""
    root = builder.data_dir_root
    if not type(builder).__module__.startswith("tensorflow_datasets."):
        builder.download_and_prepare()  # Ours (`mnist5k`) or the user's own: no network needed.
        return
    if builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
        manual_dir = os.path.join(root, "downloads", "manual")
        if not os.path.isdir(manual_dir) or not os.listdir(manual_dir):
            raise ValueError(
                f"{name} must be downloaded by hand: put its files in {manual_dir} (the first run "
                f"then builds it into {root}), or set config.data.data_dir to a directory where it "
                f"is already prepared. TFDS's instructions:\n{builder.MANUAL_DOWNLOAD_INSTRUCTIONS}"
            )
    elif not _network_available():
        raise ValueError(f"{name} is not prepared in {root} and needs a download. {OFFLINE_HINT}")
    try:
        builder.download_and_prepare()
    except Exception as e:
        raise ValueError(
            f"Could not download and prepare {name} in {root} ({type(e).__name__}: {e}). "
            f"{OFFLINE_HINT}"
        ) from e


def get_builder(data_config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
    """The prepared TFDS builder of `data_config.dataset` (any TFDS name, or `folder:/path`)."""
    name, data_dir = data_config.dataset, data_config.get("data_dir")
    if name.startswith(FOLDER_PREFIX):
        folder = name[len(FOLDER_PREFIX) :]
        return datasets.folder_builder(folder, data_config.image_size, data_dir)
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        known = tfds.list_builders(with_community_datasets=False)
        close = difflib.get_close_matches(name.split("/")[0], known, n=5)
        raise ValueError(
            f"Unknown dataset {name!r}."
            + (f" Did you mean {', '.join(close)}?" if close else "")
            + " Use a TFDS name (https://www.tensorflow.org/datasets/catalog), 'mnist5k' or "
            "'folder:/path/to/images'."
        ) from e
    except ValueError as e:  # E.g. an unknown config, where TFDS's message lists none.
        base, _, config_name = name.partition(":")[0].partition("/")
        configs = sorted(tfds.builder_cls(base).builder_configs) if config_name else []
        if config_name and config_name not in configs:
            raise ValueError(f"{base} has no config {config_name!r}; it has {configs}.") from e
        raise
    if not builder.is_prepared():  # one process prepares a shared data_dir, the others wait
        parallel.on_process_0(lambda: _prepare(builder, name), f"Preparing {name}")
        builder = tfds.builder(name, data_dir=data_dir)
        if not builder.is_prepared():  # this process's data_dir is not process 0's
            _prepare(builder, name)
    return builder


def _check(builder: tfds.core.DatasetBuilder, data_config: ml_collections.ConfigDict) -> None:
    """Split, image shape, channel and label checks that need no data."""
    name, split = data_config.dataset, data_config.split
    splits = builder.info.splits
    if splits:  # Empty only when TFDS does not know them (e.g. under tfds.testing.mock_data).
        try:
            splits[split]
        except (KeyError, ValueError) as e:
            raise ValueError(
                f"{name} has no split {split!r}; its splits are {sorted(splits)} (sub-splits such "
                "as 'train[:90%]' work too). Set config.data.split."
            ) from e
    features = dict(builder.info.features.items())
    if not isinstance(features.get("image"), tfds.features.Image):
        raise ValueError(f"{name} has no 'image' feature; its features are {sorted(features)}.")
    height, width, channels = features["image"].shape
    size, num_channels = data_config.image_size, data_config.num_channels
    if height is not None and width is not None and min(height, width) < size:
        raise ValueError(
            f"{name} has {height}x{width} images, smaller than config.data.image_size={size}: "
            "images are center-cropped and resized down, never up. Lower image_size."
        )
    if channels != num_channels and not (channels == 1 and num_channels == 3):
        raise ValueError(
            f"{name} has {channels}-channel images but config.data.num_channels={num_channels}; "
            f"set num_channels={channels} (grayscale data may also use 3: it is tiled)."
        )
    if data_config.get("class_conditional", False) and not isinstance(
        features.get("label"), tfds.features.ClassLabel
    ):
        raise ValueError(
            f"config.data.class_conditional=True but {name} has no ClassLabel 'label' feature "
            f"(its features are {sorted(features)}). Set class_conditional=False."
        )


def check_dataset(data_config: ml_collections.ConfigDict) -> None:
    """Prepares the dataset if it is not yet and checks it against ``data_config`` (the name, the
    split, image size and channels, labels; a folder's every image header): what a run checks
    at start, before it writes anything."""
    _check(get_builder(data_config), data_config)


def center_crop_resize(image: tf.Tensor, image_size: int) -> tf.Tensor:
    """uint8 [H, W, C] -> uint8 [S, S, C]: the centered min(H, W) square, area-resized to S."""
    if image.shape[0] == image.shape[1] == image_size:
        return image
    height, width = tf.shape(image)[0], tf.shape(image)[1]
    side = tf.minimum(height, width)
    check = tf.debugging.Assert(side >= image_size, [_TOO_SMALL, height, width])
    with tf.control_dependencies([check]):
        top, left = (height - side) // 2, (width - side) // 2
    square = tf.image.crop_to_bounding_box(image, top, left, side, side)
    resized = tf.image.resize(square, [image_size, image_size], method="area")
    return tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)


def _example_fn(
    decode: Callable[[tf.Tensor], tf.Tensor],
    data_config: ml_collections.ConfigDict,
    flip_seed: int,
) -> Callable[[tf.Tensor, dict], dict]:
    """(index in epoch, raw example) -> {"image": float32 [S, S, C] in [-1, 1], "label"?}."""
    size, num_channels = data_config.image_size, data_config.num_channels

    def fn(index: tf.Tensor, example: dict) -> dict:
        image = center_crop_resize(decode(example["image"]), size)
        if image.shape[-1] != num_channels:  # Grayscale data, RGB model: _check allows only this.
            image = tf.tile(image, [1, 1, num_channels])
        if data_config.random_flip:
            seed = tf.stack([tf.constant(flip_seed, tf.int64), index])
            image = tf.image.stateless_random_flip_left_right(image, seed)
        out = {"image": tf.cast(image, tf.float32) / 127.5 - 1.0}
        if data_config.get("class_conditional", False):
            out["label"] = tf.cast(example["label"], tf.int32)
        return out

    return fn


def _epoch_seeds(seed: int, process_index: int, epoch: int) -> tuple[int, int, int]:
    """(file shuffle, example shuffle, flip) seeds of one epoch of one process."""
    state = np.random.SeedSequence([seed % 2**64, process_index, epoch]).generate_state(3)
    return tuple(int(s) for s in state)


def create_dataset(
    data_config: ml_collections.ConfigDict,
    *,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
    start_step: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
    """Endless iterator of this process's batches, starting at global step `start_step`.

    Yields {"image": float32 [B_local, S, S, C] in [-1, 1]} (plus "label": int32 [B_local] when
    `data_config.class_conditional`), B_local = batch_size // process_count. Batch k of
    `create_dataset(..., start_step=s)` is batch s + k of a run started at step 0.
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if data_config.batch_size % process_count:
        raise ValueError(
            f"config.data.batch_size={data_config.batch_size} must be divisible by the number of "
            f"processes ({process_count}): each process loads an equal share of the global batch."
        )
    if start_step < 0:
        raise ValueError(f"start_step={start_step} must be >= 0.")
    local_batch = data_config.batch_size // process_count
    builder = get_builder(data_config)
    _check(builder, data_config)
    split = tfds.split_for_jax_process(
        data_config.split,
        process_index=process_index,
        process_count=process_count,
        drop_remainder=True,
    )
    decoders = {"image": tfds.decode.SkipDecoding()}  # Decode after the resume skip.
    decode = builder.info.features["image"].decode_example
    num_examples = int(builder.as_dataset(split=split, decoders=decoders).cardinality())
    steps_per_epoch = num_examples // local_batch
    if steps_per_epoch < 1:
        raise ValueError(
            f"{data_config.dataset} split {data_config.split!r} gives {num_examples} examples to "
            f"process {process_index} of {process_count}, fewer than its batch of {local_batch}."
        )

    def epoch_dataset(epoch: int, skip_steps: int) -> tf.data.Dataset:
        file_seed, shuffle_seed, flip_seed = _epoch_seeds(seed, process_index, epoch)
        ds = builder.as_dataset(
            split=split,
            shuffle_files=True,
            decoders=decoders,
            read_config=tfds.ReadConfig(shuffle_seed=file_seed, try_autocache=False),
        )
        ds = ds.shuffle(data_config.get("shuffle_buffer", 10_000), seed=shuffle_seed)
        ds = ds.enumerate().skip(skip_steps * local_batch)
        ds = ds.map(
            _example_fn(decode, data_config, flip_seed), num_parallel_calls=tf.data.AUTOTUNE
        )
        ds = ds.batch(local_batch, drop_remainder=True).prefetch(_PREFETCH_BATCHES)
        options = tf.data.Options()
        options.deterministic = True
        # tf.data's autotuner stalls each new epoch's pipeline for 10-60 s when the training
        # step keeps every core busy (measured on a 2-core CPU: 7 stalls doubled the default
        # run's training time); fixed parallelism and prefetch do not.
        options.autotune.enabled = False
        return ds.with_options(options)

    return _batches(epoch_dataset, steps_per_epoch, start_step, data_config)


def _start_epoch(
    epoch_dataset: Callable[[int, int], tf.data.Dataset], epoch: int, skip_steps: int
) -> tuple[dict[str, np.ndarray], Iterator[dict[str, np.ndarray]]]:
    """Builds one epoch's pipeline and waits for its first batch (filling its shuffle buffer)."""
    batches = iter(tfds.as_numpy(epoch_dataset(epoch, skip_steps)))
    return next(batches), batches  # skip_steps < steps_per_epoch: there is a first batch.


def _batches(
    epoch_dataset: Callable[[int, int], tf.data.Dataset],
    steps_per_epoch: int,
    start_step: int,
    data_config: ml_collections.ConfigDict,
) -> Iterator[dict[str, np.ndarray]]:
    """Chains the per-epoch pipelines from `start_step` on, starting each one an epoch ahead."""
    epoch, skip_steps = divmod(start_step, steps_per_epoch)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        upcoming = pool.submit(_start_epoch, epoch_dataset, epoch, skip_steps)
        while True:
            try:
                first, rest = upcoming.result()
                upcoming = pool.submit(_start_epoch, epoch_dataset, epoch + 1, 0)
                yield first
                yield from rest
            except Exception as e:
                if isinstance(e, tf.errors.InvalidArgumentError) and _TOO_SMALL in e.message:
                    height, width = re.findall(r"\[(\d+)\]", e.message)[-2:]
                    raise ValueError(
                        f"{data_config.dataset} has a {height}x{width} image, smaller than "
                        f"config.data.image_size={data_config.image_size}: images are "
                        "center-cropped and resized down, never up. Lower image_size."
                    ) from e
                raise
            epoch += 1


def iterate_split(
    data_config: ml_collections.ConfigDict, split: str, batch_size: int
) -> tuple[int, Iterator[dict[str, np.ndarray]]]:
    """(number of examples, one ordered pass over ``split``) for evaluation: every example once,
    unshuffled and unflipped, preprocessed like training data but kept as 8 bits.

    Yields {"image": uint8 [b, S, S, C], "label": int32 [b] (if the dataset has labels)} with
    b = batch_size except in the last batch. Every process reads the whole split.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size={batch_size} must be positive.")
    data_config = ml_collections.ConfigDict(dict(data_config.to_dict(), split=split))
    builder = get_builder(data_config)
    _check(builder, data_config)
    size, num_channels = data_config.image_size, data_config.num_channels
    label = dict(builder.info.features.items()).get("label")
    has_label = isinstance(label, tfds.features.ClassLabel)

    def example_fn(example: dict) -> dict:
        image = center_crop_resize(example["image"], size)
        if image.shape[-1] != num_channels:  # grayscale data for an RGB model, as in training
            image = tf.tile(image, [1, 1, num_channels])
        out = {"image": image}
        if has_label:
            out["label"] = tf.cast(example["label"], tf.int32)
        return out

    ds = builder.as_dataset(split=split, shuffle_files=False)
    num_examples = int(ds.cardinality())
    ds = ds.map(example_fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
    return num_examples, iter(tfds.as_numpy(ds))
