"""Preprocessing from a model's own configuration: timm data configs, transformers image processors, open_clip."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from PIL import Image

from finercam.errors import InvalidArgumentError
from finercam.models.preprocess import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    INTERPOLATIONS,
    PIL_CODES,
    PREPROCESS_PRESETS,
    Preprocess,
    Size,
)


def _triple(values: Sequence[float] | float, what: str) -> tuple[float, float, float]:
    if isinstance(values, int | float):
        return (float(values),) * 3  # type: ignore[return-value]
    items = tuple(float(v) for v in values)
    if len(items) == 1:
        items = items * 3
    if len(items) != 3:
        raise InvalidArgumentError(f"{what} must have 1 or 3 values (RGB); got {values!r}")
    return items  # type: ignore[return-value]


def _pair(size: int | Sequence[int]) -> Size:
    if isinstance(size, int):
        return (size, size)
    values = tuple(int(s) for s in size)
    return (values[-2], values[-1])


def from_timm_config(config: Mapping[str, object], name: str) -> Preprocess:
    """timm's evaluation transform from ``timm.data.resolve_data_config`` (``input_size``, ``crop_pct``,
    ``crop_mode``, ``interpolation``, ``mean``, ``std``)."""
    height, width = _pair(config.get("input_size", (3, 224, 224)))  # type: ignore[arg-type]
    crop_pct = float(config.get("crop_pct") or 0.875)  # type: ignore[arg-type]
    interpolation = str(config.get("interpolation") or "bilinear")
    if interpolation not in INTERPOLATIONS:
        interpolation = "bicubic" if interpolation == "random" else "bilinear"
    scale = (math.floor(height / crop_pct), math.floor(width / crop_pct))
    if config.get("crop_mode") == "squash" or scale[0] != scale[1]:
        resize: int | Size = scale
    else:
        resize = scale[0]
    return Preprocess(
        f"timm config of {name}", resize=resize, crop=(height, width), interpolation=interpolation,
        mean=_triple(config.get("mean", IMAGENET_MEAN), "mean"),  # type: ignore[arg-type]
        std=_triple(config.get("std", IMAGENET_STD), "std"),  # type: ignore[arg-type]
    )


CONVNEXT_FULL_SIZE = 384
"""ConvNextImageProcessor warps to ``shortest_edge`` from this size on; below it, it resizes to
``shortest_edge / crop_pct`` and centre-crops ``shortest_edge``."""


def from_hf_processor(config: Mapping[str, object], name: str) -> Preprocess:
    """A transformers image processor's settings (``preprocessor_config.json``): ``size`` as ``shortest_edge`` or
    ``height``/``width``, ``crop_size``, ConvNext's ``crop_pct``, ``resample`` (a PIL code), ``do_rescale`` and
    ``rescale_factor`` (folded into the mean and std), ``image_mean``, ``image_std``.

    Raises:
        InvalidArgumentError: a size or crop this reading does not know (pass ``preprocess=`` explicitly).
    """
    unsupported = (f"; pass preprocess= explicitly (one of {list(PREPROCESS_PRESETS)}, or a Preprocess), or "
                   "--preprocess on the command line")
    resize: int | Size | None = None
    crop: Size | None = None
    size = config.get("size")
    if config.get("do_resize", True) and size is not None:
        if isinstance(size, int):
            resize = size
        elif isinstance(size, Mapping) and "shortest_edge" in size:
            resize = int(size["shortest_edge"])
            if config.get("image_processor_type") == "ConvNextImageProcessor" and config.get("crop_pct"):
                if resize < CONVNEXT_FULL_SIZE:  # resize to shortest_edge / crop_pct, then crop shortest_edge
                    resize, crop = int(resize / float(config["crop_pct"])), (resize, resize)  # type: ignore[arg-type]
                else:
                    resize = (resize, resize)
        elif isinstance(size, Mapping) and "height" in size and "width" in size:
            resize = (int(size["height"]), int(size["width"]))
        else:
            raise InvalidArgumentError(f"{name}: unsupported image processor size {size!r}{unsupported}")
    crop_size = config.get("crop_size")
    if crop is None and config.get("do_center_crop", False) and crop_size is not None:
        if isinstance(crop_size, Mapping) and "height" in crop_size and "width" in crop_size:
            crop = (int(crop_size["height"]), int(crop_size["width"]))
        elif isinstance(crop_size, int | list | tuple):
            crop = _pair(crop_size)  # type: ignore[arg-type]
        else:
            raise InvalidArgumentError(f"{name}: unsupported image processor crop_size {crop_size!r}{unsupported}")
    resample = config.get("resample", Image.Resampling.BILINEAR)
    interpolation = PIL_CODES.get(int(resample), "bilinear") if isinstance(resample, int) else "bilinear"
    # pixels x in [0, 255] become (x r - mean) / std; finercam computes (x / 255 - mean') / std' with
    # mean' = mean / (255 r) and std' = std / (255 r), the same numbers for any rescale factor r
    rescale = float(config.get("rescale_factor", 1 / 255)) if config.get("do_rescale", True) else 1.0  # type: ignore[arg-type]
    gain = 255 * rescale
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    if config.get("do_normalize", True):
        mean = _triple(config.get("image_mean", IMAGENET_MEAN), "image_mean")  # type: ignore[arg-type]
        std = _triple(config.get("image_std", IMAGENET_STD), "image_std")  # type: ignore[arg-type]
    elif not math.isclose(gain, 1.0, rel_tol=1e-6):
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    if mean is not None and std is not None and not math.isclose(gain, 1.0, rel_tol=1e-6):
        mean = tuple(value / gain for value in mean)  # type: ignore[assignment]
        std = tuple(value / gain for value in std)  # type: ignore[assignment]
    return Preprocess(
        f"image processor of {name}", resize=resize, crop=crop, interpolation=interpolation, mean=mean, std=std
    )


def from_open_clip_config(config: Mapping[str, object], name: str) -> Preprocess:
    """open_clip's ``preprocess_cfg`` (``size``, ``resize_mode``, ``interpolation``, ``mean``, ``std``)."""
    height, width = _pair(config.get("size", 224))  # type: ignore[arg-type]
    interpolation = str(config.get("interpolation", "bicubic"))
    mode = config.get("resize_mode", "shortest")
    resize: int | Size = (height, width) if mode == "squash" or height != width else height
    if mode not in ("shortest", "squash"):
        resize = height  # 'longest' (letterbox) is approximated by the usual shorter-side resize + centre crop
    return Preprocess(
        f"open_clip config of {name}", resize=resize, crop=(height, width),
        interpolation=interpolation if interpolation in INTERPOLATIONS else "bicubic",
        mean=_triple(config.get("mean", CLIP_MEAN), "mean"),  # type: ignore[arg-type]
        std=_triple(config.get("std", CLIP_STD), "std"),  # type: ignore[arg-type]
    )
