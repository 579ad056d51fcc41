r"""Metrics of explanation quality. Each declares its name and whether higher is better (see :data:`METRICS`).

Localization against ground-truth masks: the pointing game (is the map's peak inside the mask, grown by a tolerance)
and the energy inside the mask (the share of the map's mass that falls inside it).

Faithfulness: the relative confidence drop at ``k`` (RD@k, the Finer-CAM paper's headline metric): mask the top
``k`` of the map's pixels and compare how much the target's probability falls with how much the most similar
reference's does, ``RD = (p_c - p^*_c) - (p_d - p^*_d)`` (``p`` before masking, ``p^*`` after; softmax
probabilities). Masking pixels that tell ``c`` apart from ``d`` hurts ``c`` more than ``d``: higher is better.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from finercam.capture import extract_logits
from finercam.errors import InvalidArgumentError

DEFAULT_KS = (0.05, 0.10)
FILLS = ("mean", "zero")


@dataclass(frozen=True)
class MetricInfo:
    """What a metric is called and which direction is better."""

    name: str
    higher_is_better: bool
    description: str


def rd_name(k: float) -> str:
    """The name of RD at fraction ``k``: ``rd@0.05``, ``rd@0.10``."""
    return f"rd@{k:.2f}"


METRICS = {
    "pointing": MetricInfo("pointing", True, "share of maps whose peak lies inside the mask grown by d px"),
    "energy": MetricInfo("energy", True, "share of the map's mass inside the mask"),
    **{
        rd_name(k): MetricInfo(
            rd_name(k), True,
            f"relative confidence drop when the top {k:.0%} of the map's pixels are masked: "
            "(p_c - p*_c) - (p_d - p*_d), d the most similar reference",
        )
        for k in DEFAULT_KS
    },
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


def top_fraction_mask(maps: Tensor, k: float) -> Tensor:
    """``(B, H, W)`` bool: the ``max(1, round(k * H * W))`` pixels of highest value in each map.

    Ties are broken deterministically: among equal values the pixel that comes first in row-major order wins (a
    stable sort), so an all-zero map masks its first pixels.
    """
    _check_fraction(k)
    flat = maps.flatten(1)
    count = max(1, round(k * flat.shape[1]))
    order = torch.sort(flat.float(), dim=1, descending=True, stable=True).indices[:, :count]
    chosen = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, order, True)
    return chosen.view_as(maps)


def _check_fraction(k: object) -> float:
    if isinstance(k, bool) or not isinstance(k, numbers.Real) or not 0 < float(k) <= 1:
        raise InvalidArgumentError(f"k must be a fraction of the pixels in (0, 1], e.g. 0.05; got {k!r}")
    return float(k)


def _fill_values(fill: str | float | Sequence[float] | Tensor, mean: Sequence[float] | Tensor | None,
                 images: Tensor) -> Tensor:
    """The ``(1, C, 1, 1)`` value that replaces masked pixels."""
    if isinstance(fill, str):
        if fill not in FILLS:
            raise InvalidArgumentError(f"fill must be one of {list(FILLS)}, a number or one value per channel; "
                                       f"got {fill!r}")
        if fill == "zero":
            value: Tensor | float | Sequence[float] = 0.0
        elif mean is None:
            raise InvalidArgumentError(
                "fill='mean' needs mean=: the per-channel mean of the model's input normalisation (pixels filled "
                "with it are zero in normalised space)"
            )
        else:
            value = mean
    else:
        value = fill
    tensor = torch.as_tensor(value, dtype=images.dtype, device=images.device).flatten()
    if tensor.numel() not in (1, images.shape[1]):
        raise InvalidArgumentError(
            f"the fill has {tensor.numel()} values but the images have {images.shape[1]} channels"
        )
    return tensor.expand(images.shape[1]).view(1, -1, 1, 1)


def relative_confidence_drop(
    model: nn.Module,
    images: Tensor,
    maps: Tensor,
    targets: Tensor,
    references: Tensor,
    ks: Sequence[float] = DEFAULT_KS,
    fill: str | float | Sequence[float] | Tensor = "mean",
    mean: Sequence[float] | Tensor | None = None,
    *,
    clean_logits: Tensor | None = None,
) -> dict[float, Tensor]:
    r"""RD@k of every image: ``(p_c - p^*_c) - (p_d - p^*_d)`` after masking the top ``k`` of its map's pixels.

    For each ``k`` all masked images go through the model in one batched forward pass, so RD at two fractions costs
    at most three passes (one clean, unless ``clean_logits`` is given, and one per ``k``). The model is run as it is
    (put it in eval mode first) without gradients.

    Args:
        model: the classifier, taking ``images`` and returning logits ``(B, C)`` (or a tuple / ``.logits``).
        images: ``(B, C, H, W)`` the model's inputs.
        maps: ``(B, H, W)`` saliency maps at input resolution (e.g. ``result.maps``).
        targets: ``(B,)`` the explained classes ``c``.
        references: ``(B, T)`` or ``(B,)`` reference classes; ``d`` is the first (most similar) of each row.
        ks: fractions of the pixels to mask, each in ``(0, 1]``; ``round(k * H * W)`` pixels (at least one), ties
            broken as in :func:`top_fraction_mask`.
        fill: what masked pixels become: ``"mean"`` (``mean``, i.e. zero in the model's normalised space), ``"zero"``
            (0 in input space), a number, or one value per channel.
        mean: the per-channel mean of the model's input normalisation, for ``fill="mean"``.
        clean_logits: ``(B, C)`` logits of the unmasked images, if already known (e.g. ``result.logits``).

    Returns:
        ``{k: (B,) RD@k}`` in the order of ``ks``.
    """
    if images.ndim != 4 or maps.ndim != 3 or maps.shape[0] != images.shape[0] or maps.shape[1:] != images.shape[2:]:
        raise InvalidArgumentError(
            f"maps must be (B, H, W) at the images' resolution; got maps {tuple(maps.shape)} for images "
            f"{tuple(images.shape)} (upsample layer-resolution maps first)"
        )
    fractions = [_check_fraction(k) for k in ks]
    batch = images.shape[0]
    targets = torch.as_tensor(targets, device=images.device).long().reshape(-1)
    references = torch.as_tensor(references, device=images.device).long()
    reference = (references[:, 0] if references.ndim == 2 else references).reshape(-1)
    if targets.shape[0] != batch or reference.shape[0] != batch:
        raise InvalidArgumentError(f"give one target and one reference row per image ({batch} images)")
    if bool((reference < 0).any()):
        raise InvalidArgumentError("RD needs a reference class for every image; some rows have none (-1)")
    value = _fill_values(fill, mean, images)
    pair = torch.stack([targets, reference], dim=1)

    def probabilities(batch_images: Tensor) -> Tensor:
        return torch.softmax(extract_logits(model(batch_images)).float(), dim=1).gather(1, pair)

    with torch.no_grad():
        clean = (
            probabilities(images) if clean_logits is None
            else torch.softmax(clean_logits.float(), dim=1).gather(1, pair.to(clean_logits.device))
        ).to(images.device)
        drops: dict[float, Tensor] = {}
        for k in fractions:
            masked = torch.where(top_fraction_mask(maps.to(images.device), k)[:, None], value, images)
            drop = clean - probabilities(masked)
            drops[k] = drop[:, 0] - drop[:, 1]
    return drops


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
