"""`folder:/path` datasets: every PNG/JPEG under a folder, as a TFDS dataset built on first use.

Each image is center-cropped to its short side and resized (area average, PIL's BOX filter) to
`image_size` once, at build time, and stored as uint8: grayscale (1 channel) when every image is
grayscale, RGB otherwise. The prepared dataset lives in
`<data_dir>/folder_images/<folder name>_<image_size>px_<hash>/`, where the hash covers the
folder's path, `image_size` and every file's path, size and modification time, so adding,
removing or editing an image builds a fresh copy and an unchanged folder is never rebuilt.
"""

import dataclasses
import hashlib
import os
import re

import numpy as np
import PIL.Image
import PIL.ImageOps
import tensorflow_datasets as tfds

from ddpm_jax import parallel

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
GRAYSCALE_MODES = ("1", "L", "LA")


def list_images(folder: str) -> list[str]:
    """Sorted paths, relative to `folder`, of every PNG/JPEG under it (recursively)."""
    if not os.path.isdir(folder):
        raise ValueError(f"dataset 'folder:{folder}': {folder} is not a directory.")
    files = sorted(
        os.path.relpath(os.path.join(root, name), folder)
        for root, _, names in os.walk(folder, followlinks=True)
        for name in names
        if name.lower().endswith(IMAGE_EXTENSIONS)
    )
    if not files:
        raise ValueError(
            f"dataset 'folder:{folder}': no images found (searched recursively for files "
            f"ending in {', '.join(IMAGE_EXTENSIONS)})."
        )
    return files


def _too_small(path: str, size: tuple[int, int], image_size: int) -> ValueError:
    return ValueError(
        f"Image {path} is {size[0]}x{size[1]} (WxH), smaller than image_size={image_size}: "
        "images are center-cropped to their short side and resized down, never up. Remove it "
        "or lower config.data.image_size."
    )


def _scan(folder: str, files: list[str], image_size: int) -> int:
    """Checks every header (readable, large enough); returns 1 if all are grayscale, else 3."""
    grayscale = True
    for rel in files:
        path = os.path.join(folder, rel)
        try:
            with PIL.Image.open(path) as image:
                mode, size = image.mode, image.size
        except OSError as e:
            raise ValueError(f"Cannot read image {path}: {e}. Fix or remove the file.") from e
        if min(size) < image_size:
            raise _too_small(path, size, image_size)
        grayscale = grayscale and mode in GRAYSCALE_MODES
    return 1 if grayscale else 3


def center_crop_resize(image: PIL.Image.Image, image_size: int) -> PIL.Image.Image:
    """Crops the centered square of side min(W, H), then area-resizes it to image_size."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return image.resize(
        (image_size, image_size), PIL.Image.Resampling.BOX, box=(left, top, left + side, top + side)
    )


def load_image(path: str, image_size: int, num_channels: int) -> np.ndarray:
    """Decodes `path` (EXIF orientation applied) to a uint8 [image_size, image_size, C] array."""
    try:
        with PIL.Image.open(path) as image:
            image = PIL.ImageOps.exif_transpose(image).convert("L" if num_channels == 1 else "RGB")
    except OSError as e:
        raise ValueError(f"Cannot decode image {path}: {e}. Fix or remove the file.") from e
    if min(image.size) < image_size:
        raise _too_small(path, image.size, image_size)
    array = np.asarray(center_crop_resize(image, image_size), dtype=np.uint8)
    return array.reshape(image_size, image_size, num_channels)


@dataclasses.dataclass(eq=False)
class FolderImagesConfig(tfds.core.BuilderConfig):
    """One folder at one resolution; `name` is the cache key (see the module docstring)."""

    folder: str = ""
    image_size: int = 0
    num_channels: int = 3
    files: tuple[str, ...] = dataclasses.field(default=(), repr=False)


class FolderImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A single "train" split holding every image of `builder_config.folder`."""

    name = "folder_images"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}

    def _info(self) -> tfds.core.DatasetInfo:
        config = self.builder_config
        size = config.image_size
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                f"Images under {config.folder}, center-cropped and resized to {size}x{size}."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(size, size, config.num_channels)),
                    "filename": tfds.features.Text(),
                }
            ),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        del dl_manager  # Nothing to download.
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        config = self.builder_config
        for rel in config.files:
            path = os.path.join(config.folder, rel)
            image = load_image(path, config.image_size, config.num_channels)
            yield rel, {"image": image, "filename": rel}


def _config_name(folder: str, files: list[str], image_size: int) -> str:
    digest = hashlib.sha256(f"{folder}\0{image_size}".encode())
    for rel in files:
        stat = os.stat(os.path.join(folder, rel))
        digest.update(f"\0{rel}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    slug = re.sub(r"[^a-z0-9]+", "_", os.path.basename(folder).lower()).strip("_")[:40]
    return f"{slug or 'root'}_{image_size}px_{digest.hexdigest()[:16]}"


def folder_builder(
    folder: str, image_size: int, data_dir: str | None = None
) -> tfds.core.DatasetBuilder:
    """The prepared TFDS builder of `folder` at `image_size`, building it if needed.

    `data_dir` defaults to TFDS's (`$TFDS_DATA_DIR` or `~/tensorflow_datasets`).
    """
    folder = os.path.abspath(os.path.expanduser(folder))
    files = list_images(folder)
    name = _config_name(folder, files, image_size)
    root = os.path.expanduser(data_dir) if data_dir else tfds.core.constants.get_default_data_dir()
    prepared = os.path.join(root, FolderImages.name, name, str(FolderImages.VERSION))
    def is_prepared() -> bool:
        return os.path.exists(os.path.join(prepared, "dataset_info.json"))

    def prepare() -> None:
        config = FolderImagesConfig(
            name=name,
            folder=folder,
            image_size=image_size,
            num_channels=_scan(folder, files, image_size),
            files=tuple(files),
        )
        FolderImages(config=config, data_dir=root).download_and_prepare()

    if not is_prepared():  # one process prepares a shared data_dir, the others wait
        parallel.on_process_0(prepare, f"Preparing the images of {folder}")
        if not is_prepared():  # this process's data_dir is not process 0's
            prepare()
    return tfds.builder_from_directory(prepared)
