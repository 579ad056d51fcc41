r"""Localization metrics: does a map point at the ground truth, and how much of its mass lies there.

* pointing game: is the map's peak inside the ground-truth region grown by a tolerance of ``d`` pixels (a square
  neighbourhood: Chebyshev distance ``<= d``);
* energy: the share of the map's mass inside the region.

Regions come as boolean masks ``(B, H, W)`` at the map's resolution; :func:`boxes_to_masks` and
:func:`keypoints_to_masks` rasterise boxes and keypoints (a keypoint is its pixel; give it a tolerance, or a radius
for the energy).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from finercam.errors import InvalidArgumentError


def pointing_hits(maps: Tensor, masks: Tensor, dilation: int = 1) -> Tensor:
    """``(B,)`` bool: whether each map's maximum falls inside its mask dilated by ``dilation`` pixels.

    An empty mask is never hit, nor is it by a flat map (e.g. all zero: no evidence, so no peak). Among equal maxima
    the first in row-major order is the peak.
    """
    _check_pair(maps, masks)
    grown = F.max_pool2d(masks[:, None].float(), 2 * dilation + 1, 1, dilation)[:, 0] > 0 if dilation else masks
    flat = maps.flatten(1)
    hits = grown.flatten(1).gather(1, flat.argmax(dim=1)[:, None]).squeeze(1).bool()
    return hits & (flat.amax(dim=1) > flat.amin(dim=1))


def mask_energy(maps: Tensor, masks: Tensor) -> Tensor:
    """``(B,)`` fraction of each map's total mass inside its mask (0 for an all-zero map)."""
    _check_pair(maps, masks)
    total = maps.flatten(1).sum(dim=1)
    inside = (maps * masks).flatten(1).sum(dim=1)
    return torch.where(total > 0, inside / total.clamp(min=1e-12), torch.zeros_like(total))


def _check_pair(maps: Tensor, masks: Tensor) -> None:
    if maps.ndim != 3 or masks.shape != maps.shape:
        raise InvalidArgumentError(
            f"maps and masks must both be (B, H, W) of the same shape; got {tuple(maps.shape)} and "
            f"{tuple(masks.shape)}"
        )


def boxes_to_masks(boxes: Tensor, valid: Tensor | None, size: tuple[int, int]) -> Tensor:
    """``(B, H, W)`` bool: the union of each image's boxes.

    Args:
        boxes: ``(B, N, 4)`` ``(x0, y0, x1, y1)`` in pixel coordinates of the map (pixel ``(x, y)`` covers
            ``[x, x + 1) x [y, y + 1)``; a pixel is inside when its centre is).
        valid: ``(B, N)`` bool, or ``None`` for all boxes.
        size: ``(H, W)``.
    """
    if boxes.ndim != 3 or boxes.shape[-1] != 4:
        raise InvalidArgumentError(f"boxes must be (B, N, 4) as (x0, y0, x1, y1); got {tuple(boxes.shape)}")
    height, width = size
    ys = torch.arange(height, device=boxes.device, dtype=torch.float32) + 0.5
    xs = torch.arange(width, device=boxes.device, dtype=torch.float32) + 0.5
    b = boxes.float()[..., None, None]  # (B, N, 4, 1, 1)
    inside_x = (xs >= b[:, :, 0]) & (xs < b[:, :, 2])  # (B, N, 1, W)
    inside_y = (ys[:, None] >= b[:, :, 1]) & (ys[:, None] < b[:, :, 3])  # (B, N, H, 1)
    inside = inside_x & inside_y
    if valid is not None:
        inside = inside & valid[:, :, None, None].to(inside.device)
    return inside.any(dim=1)


def keypoints_to_masks(points: Tensor, valid: Tensor | None, size: tuple[int, int], radius: float = 0.0) -> Tensor:
    """``(B, H, W)`` bool: the pixels within ``radius`` (Euclidean, between pixel centres) of each image's visible
    keypoints; ``radius=0`` marks the pixel containing each keypoint.

    Args:
        points: ``(B, N, 2)`` ``(x, y)`` in pixel coordinates of the map. valid: ``(B, N)`` visibility, or ``None``.
    """
    if points.ndim != 3 or points.shape[-1] != 2:
        raise InvalidArgumentError(f"keypoints must be (B, N, 2) as (x, y); got {tuple(points.shape)}")
    height, width = size
    ys = torch.arange(height, device=points.device, dtype=torch.float32)
    xs = torch.arange(width, device=points.device, dtype=torch.float32)
    p = points.float()
    if radius > 0:
        dx = xs + 0.5 - p[..., 0, None, None]
        dy = ys[:, None] + 0.5 - p[..., 1, None, None]
        inside = dx**2 + dy**2 <= radius**2
    else:
        inside = (xs == p[..., 0, None, None].floor()) & (ys[:, None] == p[..., 1, None, None].floor())
    if valid is not None:
        inside = inside & valid[:, :, None, None].to(inside.device)
    return inside.any(dim=1)
