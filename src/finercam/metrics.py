"""Metrics of explanation quality. Each declares its name and whether higher is better (see :data:`METRICS`).

Localization against ground-truth masks: the pointing game (is the map's peak inside the mask, grown by a tolerance)
and the energy inside the mask (the share of the map's mass that falls inside it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class MetricInfo:
    """What a metric is called and which direction is better."""

    name: str
    higher_is_better: bool
    description: str


METRICS = {
    "pointing": MetricInfo("pointing", True, "share of maps whose peak lies inside the mask grown by d px"),
    "energy": MetricInfo("energy", True, "share of the map's mass inside the mask"),
}


def pointing_hits(maps: Tensor, masks: Tensor, dilation: int = 1) -> Tensor:
    """``(B,)`` bool: whether each map's maximum falls inside its mask dilated by ``dilation`` pixels."""
    grown = F.max_pool2d(masks[:, None].float(), 2 * dilation + 1, 1, dilation)[:, 0] > 0 if dilation else masks
    peaks = maps.flatten(1).argmax(dim=1)
    return grown.flatten(1).gather(1, peaks[:, None]).squeeze(1)


def mask_energy(maps: Tensor, masks: Tensor) -> Tensor:
    """``(B,)`` fraction of each map's total mass inside its mask (0 for an all-zero map)."""
    total = maps.flatten(1).sum(dim=1)
    inside = (maps * masks).flatten(1).sum(dim=1)
    return torch.where(total > 0, inside / total.clamp(min=1e-12), torch.zeros_like(total))
