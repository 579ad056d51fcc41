"""Reading images and ImageFolder trees with Pillow.

Images are opened with EXIF orientation applied and converted to RGB (grayscale, palette, CMYK, RGBA, 16-bit and
32-bit float images included). Pillow's decompression-bomb guard stays on. Errors name the file and what went wrong.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from finercam.errors import InvalidArgumentError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})
SPLIT_NAMES = {"train": ("train", "training"), "val": ("val", "valid", "validation", "test")}


class ImageReadError(InvalidArgumentError):
    """An image file is missing, unreadable or not an image."""


def load_image(path: str | Path) -> Image.Image:
    """Open an image as RGB with its EXIF orientation applied.

    Raises:
        ImageReadError: the file does not exist, is not an image, or is truncated or corrupt.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"image {str(path)!r} does not exist or is not a file")
    try:
        with Image.open(path) as opened:
            rgb = to_rgb(opened)
    except Image.DecompressionBombError as error:
        raise ImageReadError(f"image {str(path)!r} is too large to decode safely: {error}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ImageReadError(f"cannot read image {str(path)!r}: {error}") from None
    return rgb


def to_rgb(opened: Image.Image, *, in_place: bool = False) -> Image.Image:
    """An opened image decoded as RGB with its EXIF orientation applied (16-bit and 32-bit integer images scaled to
    8 bits, float images read in [0, 1] or [0, 255]). Raises what Pillow raises for a truncated or corrupt file, and
    :class:`ImageReadError` for float values outside [0, 255].

    ``in_place=True`` saves a copy of the pixels, but an RGB result may then be ``opened`` itself, which is unusable
    once the file is closed: use it inside the ``with Image.open(...)`` block.
    """
    if in_place:
        ImageOps.exif_transpose(opened, in_place=True)
        image = opened
    else:
        image = ImageOps.exif_transpose(opened)
    if image.mode.startswith("I;16"):  # either byte order (I;16B is ImageJ's TIFF default): the high byte
        image = Image.fromarray((np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8))  # mode L
    elif image.mode == "I":
        image = image.point(lambda value: value / 256).convert("L")
    elif image.mode == "F":
        image = _float_to_gray(image)
    if image.mode != "RGB":
        image = image.convert("RGB")
    image.load()
    return image


def _float_to_gray(image: Image.Image) -> Image.Image:
    """An 8-bit gray image of a 32-bit float one (a float TIFF): values in [0, 1] are scaled by 255, values in
    [0, 255] kept (Pillow's own conversion would clip [0, 1] to black and white).

    Raises:
        ImageReadError: values outside [0, 255] or not finite, which have no one reading as pixels.
    """
    low, high = image.getextrema()
    if not (math.isfinite(low) and math.isfinite(high)) or low < 0 or high > 255:
        raise ImageReadError(
            f"a 32-bit float image with values in [{low:g}, {high:g}]: finercam reads float images in [0, 1] or "
            "[0, 255]; rescale it (or save it as 8- or 16-bit)"
        )
    scale = 255.0 if high <= 1.0 else 1.0
    return image.point(lambda value: value * scale).convert("L")


@dataclass(frozen=True)
class ImageFolder:
    """An ImageFolder tree: one sub-folder per class, sorted by name.

    Attributes:
        root: the folder.
        classes: class names (the sub-folder names), index = class id.
        samples: ``(path, class id)`` pairs, sorted.
    """

    root: Path
    classes: tuple[str, ...]
    samples: tuple[tuple[Path, int], ...]


def image_folder(root: str | Path, classes: tuple[str, ...] | None = None) -> ImageFolder:
    """List an ImageFolder tree; ``classes`` fixes the class order (e.g. the training split's)."""
    root = Path(root)
    if not root.is_dir():
        raise InvalidArgumentError(f"dataset folder {str(root)!r} does not exist")
    found = sorted(entry.name for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    if classes is None:
        classes = tuple(found)
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise InvalidArgumentError(
            f"{str(root)!r} has class folders that the training split does not have: {unknown[:10]}"
        )
    samples = [
        (path, index)
        for index, name in enumerate(classes)
        if (root / name).is_dir()
        for path in sorted((root / name).rglob("*"))
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()
    ]
    if not classes or not samples:
        raise InvalidArgumentError(
            f"{str(root)!r} is not an ImageFolder tree: expected one sub-folder of images per class "
            f"(suffixes {sorted(IMAGE_SUFFIXES)})"
        )
    return ImageFolder(root=root, classes=tuple(classes), samples=tuple(samples))


def _split_folder(root: Path, split: str) -> Path | None:
    for name in SPLIT_NAMES[split]:
        if (root / name).is_dir():
            return root / name
    return None


def train_val_folders(root: str | Path, val_fraction: float = 0.2, seed: int = 0) -> tuple[ImageFolder, ImageFolder]:
    """The training and validation splits of a dataset folder.

    A folder with ``train/`` and ``val/`` (or ``test/``) sub-trees, as in the official Finer-CAM tutorial's
    Stanford Cars layout, uses them; a plain ImageFolder tree is split per class, ``val_fraction`` of each class
    going to validation (at least one image when the class has two or more), deterministically from ``seed``.
    """
    root = Path(root)
    train_root, val_root = _split_folder(root, "train"), _split_folder(root, "val")
    if train_root is not None and val_root is not None:
        train = image_folder(train_root)
        return train, image_folder(val_root, classes=train.classes)
    if not 0 < val_fraction < 1:
        raise InvalidArgumentError(f"val_fraction must be between 0 and 1; got {val_fraction}")
    everything = image_folder(root)
    generator = random.Random(seed)
    train_samples, val_samples = [], []
    for index in range(len(everything.classes)):
        members = [sample for sample in everything.samples if sample[1] == index]
        generator.shuffle(members)
        held_out = max(1, round(len(members) * val_fraction)) if len(members) > 1 else 0
        val_samples += members[:held_out]
        train_samples += members[held_out:]
    return (
        ImageFolder(root, everything.classes, tuple(sorted(train_samples))),
        ImageFolder(root, everything.classes, tuple(sorted(val_samples))),
    )


def check_apart(data: str | Path, out: str | Path, what: str = "store") -> None:
    """Refuse an output folder ``out`` inside the ImageFolder tree ``data`` it is made from (its files would become
    images and classes of the dataset on the next run), the tree itself, or a tree inside it; ``what`` names the
    output in errors."""
    data_path, out_path = Path(data).resolve(), Path(out).resolve()
    if not data_path.is_dir():
        return
    if out_path == data_path or data_path in out_path.parents:
        raise InvalidArgumentError(
            f"--out {str(out)!r} is inside --data {str(data)!r}: the {what}'s files would be read as images and class "
            "folders of the dataset. Give an --out folder outside the dataset"
        )
    if out_path in data_path.parents:
        raise InvalidArgumentError(
            f"--data {str(data)!r} is inside --out {str(out)!r}: the {what} would be written among the dataset's "
            "folders. Give an --out folder of its own, outside the dataset"
        )
