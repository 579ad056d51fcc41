"""Decoding one file into a model input, or the reason it cannot be: never an exception for a bad file.

Built on :func:`finercam.images.load_image` (EXIF orientation applied; grayscale, palette, CMYK, RGBA, 16-bit and
1 x 1 images converted to RGB, as ``finercam explain`` reads them). Before decoding, the header is checked against a
pixel limit (the decompression-bomb guard: Pillow only warns between ``Image.MAX_IMAGE_PIXELS`` and twice that; here
anything above the limit is skipped), and the preprocessed size is checked too, so that an extreme aspect ratio
(a 1 x 100000 strip resized to a shorter side of 256) cannot allocate gigabytes. Skip reasons start with a short
category (``empty file``, ``not an image``, ``corrupt or truncated``, ``too large``, ``preprocessing failed``,
``unreadable``), followed by details.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from torch import Tensor

from finercam.images import ImageReadError, load_image
from finercam.models.preprocess import Preprocess


@dataclass(frozen=True)
class Decoded:
    """The outcome for one file: ``pixels`` and sizes, or ``reason`` (then ``pixels`` is ``None``).

    Attributes:
        pixels: the preprocessed ``(3, H, W)`` float tensor.
        image_size: ``(height, width)`` of the decoded image, after EXIF rotation.
        reason: why the file was skipped.
    """

    pixels: Tensor | None = None
    image_size: tuple[int, int] = (0, 0)
    reason: str | None = None


def default_max_pixels() -> int:
    """Pillow's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``, about 89 million pixels by default)."""
    limit = Image.MAX_IMAGE_PIXELS
    return int(limit) if limit else 2**62


def _header(path: Path, max_pixels: int) -> tuple[tuple[int, int] | None, str | None]:
    """``(width, height)`` from the header, or a skip reason."""
    try:
        size = path.stat().st_size
    except OSError as error:
        return None, f"unreadable: {error.strerror or error}"
    if size == 0:
        return None, "empty file: 0 bytes"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                width, height = opened.size
    except Image.DecompressionBombError as error:
        return None, f"too large: {error}"
    except UnidentifiedImageError:
        return None, "not an image: Pillow cannot identify the file format"
    except (OSError, SyntaxError, ValueError) as error:
        return None, f"corrupt or truncated: {error}"
    if width * height > max_pixels:
        return None, (
            f"too large: {width} x {height} = {width * height} pixels exceeds the limit of {max_pixels} "
            "(decompression-bomb guard; raise it with --max-pixels)"
        )
    return (width, height), None


def decode(path: str | Path, preprocess: Preprocess, max_pixels: int | None = None) -> Decoded:
    """Read and preprocess one image; a bad file gives a :class:`Decoded` with its ``reason``."""
    path = Path(path)
    limit = default_max_pixels() if max_pixels is None else max_pixels
    _, reason = _header(path, limit)
    if reason is not None:
        return Decoded(reason=reason)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = load_image(path)
    except ImageReadError as error:
        text = str(error)
        category = "too large" if "too large" in text else "corrupt or truncated"
        return Decoded(reason=f"{category}: {text}")
    except Exception as error:  # a decoder bug must not end a run over a million images
        return Decoded(reason=f"unreadable: {type(error).__name__}: {error}")
    height, width = image.height, image.width
    out_height, out_width = preprocess.output_size(width, height)
    if out_height * out_width > limit:
        return Decoded(image_size=(height, width), reason=(
            f"too large: preprocessing {width} x {height} gives {out_width} x {out_height} pixels, over the limit "
            f"of {limit}"
        ))
    try:
        pixels = preprocess(image)
    except Exception as error:
        return Decoded(image_size=(height, width), reason=f"preprocessing failed: {type(error).__name__}: {error}")
    return Decoded(pixels=pixels, image_size=(height, width))
