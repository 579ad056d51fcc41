r"""Metrics of explanation quality, each declaring its name and whether higher is better (:data:`METRICS`).

* :mod:`~finercam.metrics.localization`: pointing game and energy inside a mask, box or keypoints.
* :mod:`~finercam.metrics.faithfulness`: RD@k (the paper's relative confidence drop), deletion and insertion curves.
* :mod:`~finercam.metrics.stats`: means with bootstrap confidence intervals.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from finercam.capture import extract_logits
from finercam.metrics.faithfulness import (
    CURVE_MODES,
    DEFAULT_KS,
    DEFAULT_STEPS,
    FILLS,
    Curves,
    check_fill,
    deletion_insertion,
    fill_images,
    gaussian_blur,
    pixel_ranks,
    relative_confidence_drop,
    top_fraction_mask,
)
from finercam.metrics.localization import boxes_to_masks, keypoints_to_masks, mask_energy, pointing_hits
from finercam.metrics.stats import DEFAULT_LEVEL, DEFAULT_RESAMPLES, Estimate, bootstrap


@dataclass(frozen=True)
class MetricInfo:
    """What a metric is called and which direction is better."""

    name: str
    higher_is_better: bool
    description: str


def rd_name(k: float) -> str:
    """The name of RD at fraction ``k``: ``rd@0.05``, ``rd@0.10`` (two decimals when they are exact, else every
    digit: ``rd@0.025``, so that two fractions never share a name)."""
    two = f"{k:.2f}"
    return f"rd@{two}" if float(two) == k else f"rd@{float(k)!r}"


def _rd_info(k: float) -> MetricInfo:
    return MetricInfo(rd_name(k), True, f"relative confidence drop when the top {100 * k:g}% of the map's pixels "
                      "are masked: (p_c - p*_c) - (p_d - p*_d), d the most similar reference")


METRICS = {
    "pointing": MetricInfo("pointing", True, "share of maps whose peak lies inside the mask grown by d px"),
    "energy": MetricInfo("energy", True, "share of the map's mass inside the mask"),
    **{rd_name(k): _rd_info(k) for k in DEFAULT_KS},
    "deletion": MetricInfo("deletion", False, "area under p_c as the map's top pixels are removed"),
    "deletion_ref": MetricInfo("deletion_ref", True,
                               "area under p_d (the most similar reference) as the map's top pixels are removed"),
    "insertion": MetricInfo("insertion", True, "area under p_c as the map's top pixels are inserted into the fill"),
    "insertion_ref": MetricInfo("insertion_ref", False, "area under p_d as the map's top pixels are inserted"),
}


def metric_info(name: str) -> MetricInfo:
    """The :class:`MetricInfo` of a metric name, including ``rd@K`` for any fraction ``K``."""
    if name in METRICS:
        return METRICS[name]
    if name.startswith("rd@"):
        return _rd_info(float(name[3:]))
    raise KeyError(name)


@torch.no_grad()
def top1_accuracy(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` on a dataset, evaluated in eval mode (its train/eval flag is restored)."""
    was_training = model.training
    model.eval()
    try:
        correct = sum(
            int((extract_logits(model(images[i : i + batch_size])).argmax(1) == labels[i : i + batch_size]).sum())
            for i in range(0, len(labels), batch_size)
        )
    finally:
        model.train(was_training)
    return correct / max(len(labels), 1)


__all__ = [
    "CURVE_MODES", "DEFAULT_KS", "DEFAULT_LEVEL", "DEFAULT_RESAMPLES", "DEFAULT_STEPS", "FILLS", "METRICS", "Curves",
    "Estimate", "MetricInfo",
    "bootstrap", "boxes_to_masks", "check_fill", "deletion_insertion", "fill_images", "gaussian_blur",
    "keypoints_to_masks",
    "mask_energy", "metric_info", "pixel_ranks", "pointing_hits", "rd_name", "relative_confidence_drop",
    "top1_accuracy", "top_fraction_mask",
]
