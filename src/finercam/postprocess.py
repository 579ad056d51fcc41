"""From signed raw maps at layer resolution to displayable maps at input resolution.

The convention of the anchors: ReLU, bilinear upsampling to the input size (half-pixel centres,
``align_corners=False``), then per-image min-max to ``[0, 1]``: ``(x - min) / (max - min + eps)``. A map that is zero
everywhere stays zero (never NaN).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

MINMAX_EPS = 1e-7
ROUNDING_ULPS = 16
"""A map whose range is at most this many units in the last place of its largest value is taken as constant."""


def minmax(maps: Tensor, eps: float = MINMAX_EPS) -> Tensor:
    """Scale each map ``(..., H, W)`` to ``[0, 1]`` by its own minimum and maximum.

    Computed in at least float32 and returned in the maps' dtype: in float16 or bfloat16 the ``eps`` and the rounding
    test below would be those of 3 or 2 significant digits, and a map whose range is a tenth of its values would come
    out blank. A constant map gives 0, never ``0 / 0``. A map constant up to rounding (its range within a few units in
    the last place of its values, e.g. a single cell upsampled) is constant: 0, not its rounding noise stretched to
    ``[0, 1]``.
    """
    if not maps.is_floating_point():
        low, high = maps.amin(dim=(-2, -1), keepdim=True), maps.amax(dim=(-2, -1), keepdim=True)
        return (maps - low) / (high - low + eps)
    wide = _wide(maps)
    low, high = wide.amin(dim=(-2, -1), keepdim=True), wide.amax(dim=(-2, -1), keepdim=True)
    info = torch.finfo(wide.dtype)
    span = high - low
    scaled = (wide - low) / (span + max(eps, info.tiny))
    flat = span <= ROUNDING_ULPS * info.eps * torch.maximum(high.abs(), low.abs())
    return scaled.masked_fill(flat, 0.0).to(maps.dtype)


def upsample(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear (``align_corners=False``) resize of maps ``(..., h, w)`` to ``size``."""
    leading = maps.shape[:-2]
    flat = maps.reshape(-1, 1, *maps.shape[-2:])
    if tuple(flat.shape[-2:]) != tuple(size):
        flat = F.interpolate(flat, size=size, mode="bilinear", align_corners=False)
    return flat.reshape(*leading, *size)


def normalize_maps(raw_maps: Tensor, size: tuple[int, int]) -> Tensor:
    """ReLU, upsample to ``size`` and min-max: ``(..., h, w)`` signed maps to ``(..., H, W)`` in ``[0, 1]``, in the
    maps' dtype (computed in at least float32, see :func:`minmax`)."""
    return minmax(upsample(_wide(raw_maps).clamp(min=0), size)).to(_narrow(raw_maps))


def fuse_layers(raw_maps_per_layer: list[Tensor], size: tuple[int, int]) -> Tensor:
    """Maps of several layers: each normalised at input size, averaged, and min-maxed again (in at least float32,
    returned in the first layer's dtype)."""
    if len(raw_maps_per_layer) == 1:
        return normalize_maps(raw_maps_per_layer[0], size)
    stacked = [normalize_maps(_wide(raw), size) for raw in raw_maps_per_layer]
    return minmax(sum(stacked[1:], stacked[0]) / len(stacked)).to(_narrow(raw_maps_per_layer[0]))


def _wide(maps: Tensor) -> Tensor:
    """Floating maps in at least float32 (float16 and bfloat16 are widened; float64 stays)."""
    return maps.to(torch.promote_types(maps.dtype, torch.float32))


def _narrow(maps: Tensor) -> torch.dtype:
    """The dtype normalised maps are returned in: the raw maps' own, float32 for integer maps."""
    return maps.dtype if maps.is_floating_point() else torch.float32
