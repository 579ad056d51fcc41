"""Decoding one file into a model input, or the reason it cannot be: never an exception for a bad file.

Built on :func:`finercam.images.to_rgb` (EXIF orientation applied; grayscale, palette, CMYK, RGBA, 16-bit and
1 x 1 images converted to RGB, as ``finercam explain`` reads them). Before decoding, the header is checked against a
pixel limit (the decompression-bomb guard: Pillow only warns between ``Image.MAX_IMAGE_PIXELS`` and twice that; here
anything above the limit is skipped), and the preprocessed size is checked too, so that an extreme aspect ratio
(a 1 x 100000 strip resized to a shorter side of 256) cannot allocate gigabytes. The result is ``uint8`` pixels
after the geometric steps; the pipeline normalises whole batches on the model's device. Skip reasons start with a short
category (``empty file``, ``not an image``, ``corrupt or truncated``, ``too large``, ``preprocessing failed``,
``unreadable``), followed by details.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from torch import Tensor

from finercam.images import ImageReadError, to_rgb
from finercam.models.preprocess import Preprocess


@dataclass(frozen=True)
class Decoded:
    """The outcome for one file: ``pixels`` and sizes, or ``reason`` (then ``pixels`` is ``None``).

    Attributes:
        pixels: the ``(3, H, W)`` ``uint8`` tensor after the preprocessing's geometric steps (not normalised).
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


def _opened_size(opened: Image.Image, max_pixels: int) -> str | None:
    """A skip reason when the header's size exceeds ``max_pixels``."""
    width, height = opened.size
    if width * height > max_pixels:
        return (
            f"too large: {width} x {height} = {width * height} pixels exceeds the limit of {max_pixels} "
            "(decompression-bomb guard; raise it with --max-pixels)"
        )
    return None


def decode(path: str | Path, preprocess: Preprocess, max_pixels: int | None = None) -> Decoded:
    """Read one image and apply the geometric steps of ``preprocess`` (:meth:`Preprocess.to_uint8`; normalise the
    batch with :meth:`Preprocess.normalise`); a bad file gives a :class:`Decoded` with its ``reason``.

    The file is opened once: the header's size is checked before any pixel is decoded."""
    limit = default_max_pixels() if max_pixels is None else max_pixels
    try:
        handle = open(path, "rb")  # noqa: SIM115 (closed below; Pillow leaves a file object it was given open)
    except OSError as error:
        return Decoded(reason=f"unreadable: {error.strerror or error}")
    with handle:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(handle) as opened:
                    reason = _opened_size(opened, limit)
                    if reason is not None:
                        return Decoded(reason=reason)
                    return _preprocessed(to_rgb(opened, in_place=True), preprocess, limit)
        except Image.DecompressionBombError as error:
            return Decoded(reason=f"too large: {error}")
        except UnidentifiedImageError:
            if os.fstat(handle.fileno()).st_size == 0:  # checked only for a failure: a stat per image costs
                return Decoded(reason="empty file: 0 bytes")
            return Decoded(reason="not an image: Pillow cannot identify the file format")
        except ImageReadError as error:
            return Decoded(reason=f"unreadable: {error}")
        except (OSError, SyntaxError, ValueError) as error:
            return Decoded(reason=f"corrupt or truncated: {error}")
        except Exception as error:  # a decoder bug must not end a run over a million images
            return Decoded(reason=f"unreadable: {type(error).__name__}: {error}")


def _preprocessed(image: Image.Image, preprocess: Preprocess, limit: int) -> Decoded:
    """The geometric steps of ``preprocess`` on a decoded RGB image, guarded by the pixel ``limit``."""
    height, width = image.height, image.width
    out_height, out_width = preprocess.output_size(width, height)
    if out_height * out_width > limit:
        return Decoded(image_size=(height, width), reason=(
            f"too large: preprocessing {width} x {height} gives {out_width} x {out_height} pixels, over the limit "
            f"of {limit}"
        ))
    try:
        pixels = preprocess.to_uint8(image)
    except Exception as error:
        return Decoded(image_size=(height, width), reason=f"preprocessing failed: {type(error).__name__}: {error}")
    return Decoded(pixels=pixels, image_size=(height, width))
