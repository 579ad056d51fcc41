"""Image preprocessing with Pillow and torch: resize, centre crop, tensor, normalise.

A :class:`Preprocess` is a frozen, comparable description of the steps; calling it turns a PIL image into a
``(3, H, W)`` float tensor. Presets (:data:`PREPROCESS_PRESETS`):

* ``imagenet``: shorter side to 256 (bilinear), centre crop 224, ImageNet mean/std (torchvision's evaluation).
* ``clip``: shorter side to 224 (bicubic), centre crop 224, CLIP mean/std (OpenAI CLIP / open_clip).
* ``dinov2-official``: the official Finer-CAM code's DINOv2 preprocessing (``preprocess`` in ``generate_cams.py`` and
  ``tutorials/tutorial.ipynb`` of github.com/Imageomics/Finer-CAM): the aspect ratio is kept; an image whose longest
  side exceeds 1000 px is first scaled (bicubic) so that its longest side is 1000, each side truncated to an
  integer; then each side is rounded **up** to a multiple of 14 (bicubic resize). So sides are multiples of 14 and at
  most 1008 (= 72 x 14), not 1000. It normalises with the **CLIP** mean/std, as the official code does.
* ``dinov2``: the same geometry with DINOv2's own ImageNet mean/std (as the official ``tutorials/dino_train.py`` and
  DINOv2 itself use).
* ``none``: no resizing or normalisation; pixel values in [0, 1].

Resizing follows torchvision on PIL images (which timm and the official code use): a shorter-side resize keeps
``int(size * long / short)`` for the other side; a centre crop starts at ``round((H - h) / 2)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from finercam.errors import InvalidArgumentError, InvalidTypeError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)

INTERPOLATIONS: Mapping[str, Image.Resampling] = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
PIL_CODES = {int(code): name for name, code in INTERPOLATIONS.items()}

Size = tuple[int, int]


DISPLAY_MAX_SIZE = 1000
"""The longest side of the image maps are drawn on when the model sees the whole image."""


@dataclass(frozen=True)
class Preprocess:
    """Preprocessing of one RGB PIL image into a normalised ``(3, H, W)`` float tensor.

    Steps, each skipped when its field is ``None``: ``resize`` (an int resizes the shorter side, keeping the aspect
    ratio; ``(h, w)`` resizes to exactly that), ``max_size`` (downscale so that the longest side is at most this,
    truncating), ``multiple_of`` (round each side up to a multiple, e.g. the patch size), ``crop`` (centre crop
    ``(h, w)``), then conversion to ``[0, 1]`` and ``(x - mean) / std`` when ``mean`` is set.

    Attributes:
        name: a label shown to users (a preset name, or where the settings came from).
    """

    name: str = "custom"
    resize: int | Size | None = None
    max_size: int | None = None
    multiple_of: int | None = None
    crop: Size | None = None
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None

    def __post_init__(self) -> None:
        for name in ("resize", "crop", "mean", "std"):  # lists become tuples: hashable, stable repr
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        if self.interpolation not in INTERPOLATIONS:
            raise InvalidArgumentError(
                f"unknown interpolation {self.interpolation!r}; use one of {list(INTERPOLATIONS)}"
            )
        sizes = [self.max_size, self.multiple_of, self.resize if isinstance(self.resize, int) else None]
        sizes += list(self.resize) if isinstance(self.resize, tuple) else []
        sizes += list(self.crop) if self.crop is not None else []
        if any(s is not None and (isinstance(s, bool) or not isinstance(s, int) or s < 1) for s in sizes):
            raise InvalidArgumentError(f"preprocess {self.name!r}: sizes must be positive ints; got {self}")
        if (self.mean is None) != (self.std is None):
            raise InvalidArgumentError(f"preprocess {self.name!r}: give both mean and std, or neither")
        if self.std is not None and any(s <= 0 for s in self.std):
            raise InvalidArgumentError(f"preprocess {self.name!r}: std must be positive; got {self.std}")

    @property
    def fixed_size(self) -> Size | None:
        """The output ``(H, W)`` when it does not depend on the image, else ``None``."""
        if self.crop is not None:
            return self.crop
        if isinstance(self.resize, tuple) and self.max_size is None:
            if self.multiple_of is None:
                return self.resize
            return tuple(math.ceil(s / self.multiple_of) * self.multiple_of for s in self.resize)  # type: ignore[return-value]
        return None

    def display_geometry(self) -> Preprocess:
        """The geometry to draw maps on, without normalisation (pixels in ``[0, 1]``).

        Without a centre crop the whole image reaches the model, so the maps go back onto the original image (its
        longest side at most :data:`DISPLAY_MAX_SIZE`, as the official pipeline does); with a crop, the model's view
        is shown: the same geometry without normalisation.
        """
        if self.crop is None:
            return Preprocess(name="display", max_size=DISPLAY_MAX_SIZE)
        return replace(self, mean=None, std=None)

    def output_size(self, width: int, height: int) -> Size:
        """The ``(H, W)`` of the tensor made from an image of ``width`` x ``height`` pixels."""
        return _sizes(self, width, height)[-1]

    def point_transform(self, width: int, height: int) -> tuple[float, float, float, float]:
        """Where the pixel coordinates of an image of ``width`` x ``height`` land in the preprocessed tensor:
        ``(sx, sy, dx, dy)`` with ``x' = x * sx + dx`` and ``y' = y * sy + dy`` (continuous coordinates, pixel
        ``(x, y)`` covering ``[x, x + 1) x [y, y + 1)``), for annotations (boxes, keypoints) given on the original
        image."""
        *_, final = _sizes(self, width, height)
        resized = _sizes(replace(self, crop=None), width, height)[-1]
        sy, sx = resized[0] / height, resized[1] / width
        if self.crop is None:
            return sx, sy, 0.0, 0.0
        crop_h, crop_w = final
        padded_h, padded_w = max(crop_h, resized[0]), max(crop_w, resized[1])
        pad_top, pad_left = (padded_h - resized[0]) // 2, (padded_w - resized[1]) // 2
        top, left = round((padded_h - crop_h) / 2.0), round((padded_w - crop_w) / 2.0)
        return sx, sy, float(pad_left - left), float(pad_top - top)

    def __call__(self, image: Image.Image) -> Tensor:
        """Preprocess one image: :meth:`to_uint8`, then :meth:`normalise`.

        Args:
            image: a PIL image (converted to RGB if needed).

        Returns:
            A float32 tensor ``(3, H, W)``.
        """
        return self.normalise(self.to_uint8(image))

    def to_uint8(self, image: Image.Image) -> Tensor:
        """The geometric steps (resize, crop) of one image: a ``uint8`` tensor ``(3, H, W)``, not yet normalised.

        Batch pipelines move these (a quarter of the bytes of floats) and call :meth:`normalise` on the batch, on
        the model's device.
        """
        if not isinstance(image, Image.Image):
            raise InvalidTypeError(
                f"preprocess expects a PIL.Image.Image (e.g. finercam.images.load_image(path)); "
                f"got {type(image).__name__}"
            )
        if image.mode != "RGB":
            image = image.convert("RGB")
        resample = INTERPOLATIONS[self.interpolation]
        *resizes, final = _sizes(self, image.width, image.height)
        for height, width in resizes:
            if (width, height) != image.size:
                image = image.resize((width, height), resample)
        if self.crop is not None:
            image = _center_crop(image, self.crop)
        assert (image.height, image.width) == final
        return torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1)

    def normalise(self, pixels: Tensor) -> Tensor:
        """``uint8`` pixels ``(..., 3, H, W)`` (one image or a batch, on any device) -> float32 in ``[0, 1]``, then
        ``(x - mean) / std`` when ``mean`` is set. The same operations per element as for one image, so a batch
        gives bitwise the values of its images one by one."""
        if pixels.dtype != torch.uint8:
            raise InvalidTypeError(f"normalise expects uint8 pixels (from to_uint8); got {pixels.dtype}")
        tensor = pixels.to(torch.float32).div_(255.0)
        if self.mean is not None and self.std is not None:
            mean = torch.tensor(self.mean, dtype=torch.float32, device=pixels.device)[:, None, None]
            std = torch.tensor(self.std, dtype=torch.float32, device=pixels.device)[:, None, None]
            tensor = tensor.sub_(mean).div_(std)
        return tensor

    def describe(self) -> str:
        """A one-line human description, e.g. ``imagenet: shorter side 256, crop 224x224, bilinear, mean/std ...``."""
        parts = []
        if isinstance(self.resize, int):
            parts.append(f"shorter side {self.resize}")
        elif self.resize is not None:
            parts.append(f"resize {self.resize[0]}x{self.resize[1]}")
        if self.max_size is not None:
            parts.append(f"longest side <= {self.max_size}")
        if self.multiple_of is not None:
            parts.append(f"sides rounded up to multiples of {self.multiple_of}")
        if self.crop is not None:
            parts.append(f"crop {self.crop[0]}x{self.crop[1]}")
        if parts:
            parts.append(self.interpolation)
        parts.append(f"mean {self.mean} std {self.std}" if self.mean is not None else "no normalisation")
        return f"{self.name}: " + ", ".join(parts)


def _sizes(pre: Preprocess, width: int, height: int) -> list[Size]:
    """The ``(H, W)`` after each resize step, then the final size (after the crop)."""
    steps: list[Size] = []
    h, w = height, width
    if isinstance(pre.resize, int):
        short, long = (h, w) if h <= w else (w, h)
        new_long = int(pre.resize * long / short)
        h, w = (pre.resize, new_long) if h <= w else (new_long, pre.resize)
        steps.append((h, w))
    elif pre.resize is not None:
        h, w = pre.resize
        steps.append((h, w))
    if pre.max_size is not None and max(h, w) > pre.max_size:
        scale = pre.max_size / max(h, w)
        h, w = max(1, int(h * scale)), max(1, int(w * scale))
        steps.append((h, w))
    if pre.multiple_of is not None:
        m = pre.multiple_of
        h, w = math.ceil(h / m) * m, math.ceil(w / m) * m
        steps.append((h, w))
    final = pre.crop if pre.crop is not None else (h, w)
    return [*steps, final]


def _center_crop(image: Image.Image, size: Size) -> Image.Image:
    """torchvision's ``CenterCrop`` on a PIL image: pads with black when the crop is larger than the image."""
    crop_h, crop_w = size
    if crop_w > image.width or crop_h > image.height:
        padded = Image.new("RGB", (max(crop_w, image.width), max(crop_h, image.height)))
        padded.paste(image, ((padded.width - image.width) // 2, (padded.height - image.height) // 2))
        image = padded
    top = round((image.height - crop_h) / 2.0)
    left = round((image.width - crop_w) / 2.0)
    return image.crop((left, top, left + crop_w, top + crop_h))


PREPROCESS_PRESETS: Mapping[str, Preprocess] = {
    "imagenet": Preprocess(
        "imagenet", resize=256, crop=(224, 224), interpolation="bilinear", mean=IMAGENET_MEAN, std=IMAGENET_STD
    ),
    "clip": Preprocess("clip", resize=224, crop=(224, 224), interpolation="bicubic", mean=CLIP_MEAN, std=CLIP_STD),
    "dinov2-official": Preprocess(
        "dinov2-official", max_size=1000, multiple_of=14, interpolation="bicubic", mean=CLIP_MEAN, std=CLIP_STD
    ),
    "dinov2": Preprocess(
        "dinov2", max_size=1000, multiple_of=14, interpolation="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD
    ),
    "none": Preprocess("none"),
}


def get_preprocess(preprocess: str | Preprocess) -> Preprocess:
    """A preset by name, or a :class:`Preprocess` as given.

    Raises:
        InvalidArgumentError: unknown preset name; the message lists the presets.
    """
    if isinstance(preprocess, Preprocess):
        return preprocess
    if not isinstance(preprocess, str):
        raise InvalidTypeError(
            f"preprocess must be a preset name {list(PREPROCESS_PRESETS)} or a finercam.models.Preprocess; "
            f"got {type(preprocess).__name__}"
        )
    key, at, size = preprocess.strip().lower().partition("@")
    if key not in PREPROCESS_PRESETS:
        raise InvalidArgumentError(
            f"unknown preprocessing preset {preprocess!r}; use one of {list(PREPROCESS_PRESETS)} (optionally "
            "@SIZE or @HxW, e.g. imagenet@32), or omit it to use the model's own configuration"
        )
    preset = PREPROCESS_PRESETS[key]
    return at_size(preset, size, preprocess) if at else preset


def at_size(preset: Preprocess, size: str, given: str = "") -> Preprocess:
    """A preset's normalisation at another input size (``PRESET@SIZE``, ``PRESET@HxW``), for models trained at a
    size other than 224: ``@S`` keeps the preset's geometry scaled to ``S`` (``imagenet@32``: shorter side to
    ``int(32 * 256 / 224)`` = 36, centre crop 32; ``clip@32``: shorter side and crop 32; ``none@32``: 32 x 32),
    ``@HxW`` resizes to exactly ``H x W``. The aspect-keeping DINOv2 presets take no size.
    """
    if preset.crop is None and preset.resize is None and preset.name != "none":
        raise InvalidArgumentError(
            f"preset {preset.name!r} keeps each image's own size (sides rounded to a multiple of "
            f"{preset.multiple_of}); it takes no @SIZE: give {preset.name!r} alone"
        )
    parts = size.split("x")
    if len(parts) not in (1, 2) or not all(part.isdigit() and 0 < int(part) <= 4096 for part in parts):
        raise InvalidArgumentError(
            f"preprocessing {given!r}: the size after @ must be a whole number of pixels from 1 to 4096 or HxW "
            "(e.g. imagenet@32, none@64x48)"
        )
    label = f"{preset.name}@{size}"
    if len(parts) == 2:
        return replace(preset, name=label, resize=(int(parts[0]), int(parts[1])), crop=None)
    side = int(parts[0])
    if preset.crop is None:  # "none": no geometry of its own
        return replace(preset, name=label, resize=(side, side))
    crop_ratio = preset.crop[0] / (preset.resize if isinstance(preset.resize, int) else preset.crop[0])
    return replace(preset, name=label, resize=int(side / crop_ratio), crop=(side, side))


def with_name(preprocess: Preprocess, name: str) -> Preprocess:
    """The same preprocessing under another label."""
    return replace(preprocess, name=name)
