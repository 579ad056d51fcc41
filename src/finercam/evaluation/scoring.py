"""Scoring one batch: every metric of every gamma of a :class:`~finercam.result.SweepResult`, per image.

Shared by ``finercam evaluate`` and ``finercam demo`` so that both compute the same numbers the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from finercam.errors import InvalidArgumentError
from finercam.metrics import (
    DEFAULT_KS,
    DEFAULT_STEPS,
    check_fill,
    deletion_insertion,
    mask_energy,
    pointing_hits,
    rd_name,
    relative_confidence_drop,
)
from finercam.result import SweepResult

LOCALIZATION = ("pointing", "energy")
CURVE_METRICS = {"deletion": ("deletion", "deletion_ref"), "insertion": ("insertion", "insertion_ref")}
METRIC_GROUPS = ("pointing", "energy", "rd", "deletion", "insertion")


def gamma_key(gamma: float) -> str:
    """The name of a gamma in records and tables: ``"0.6"``, ``"1"`` (``:g``), or every digit when ``:g`` would
    round it (``0.6000001``), so that two gammas never share a name."""
    short = f"{gamma:g}"
    return short if float(short) == gamma else repr(float(gamma))


@dataclass(frozen=True)
class ScoreOptions:
    """How a batch is scored; every field is recorded with the results.

    Attributes:
        metrics: groups to compute among :data:`METRIC_GROUPS` (``rd`` is RD at every ``ks``; localization needs
            ground-truth regions).
        ks: RD fractions. fill: what removed pixels become (:data:`finercam.metrics.FILLS`, or a number).
        fill_mean: the input-space value that is zero in normalised space (for ``fill="mean"``).
        fill_pixels: for ``fill="zero"`` or a number, the input-space values of that pixel value (in ``[0, 1]``;
            zero is black) under the model's normalisation (:func:`pixel_fill`); ``None``: the fill is taken in the
            input space as it is.
        blur_sigma: for ``fill="blur"``, in pixels (default: 2.5% of the longer side).
        steps: deletion / insertion steps. tolerance: pointing-game tolerance in pixels.
        pass_size: images per forward pass for the masked variants.
    """

    metrics: tuple[str, ...] = METRIC_GROUPS
    ks: tuple[float, ...] = DEFAULT_KS
    fill: str | float = "mean"
    fill_mean: tuple[float, ...] | None = None
    fill_pixels: tuple[float, ...] | None = None
    blur_sigma: float | None = None
    steps: int = DEFAULT_STEPS
    tolerance: int = 2
    pass_size: int | None = None

    def __post_init__(self) -> None:
        unknown = sorted(set(self.metrics) - set(METRIC_GROUPS))
        if unknown or not self.metrics:
            raise InvalidArgumentError(f"unknown metrics {unknown or '(none given)'}; choose among "
                                       f"{list(METRIC_GROUPS)}")
        check_fill(self.fill, self.blur_sigma)
        repeated = sorted({k for k in self.ks if list(self.ks).count(k) > 1})
        if repeated:
            raise InvalidArgumentError(f"ks repeats {repeated}: give each RD fraction once")

    @property
    def input_fill(self) -> str | float | tuple[float, ...]:
        """The fill in the model's input space, as :func:`finercam.metrics.fill_images` takes it."""
        return self.fill_pixels if self.fill_pixels is not None else self.fill

    def names(self, localization: bool) -> list[str]:
        """The metric names these options produce (``pointing``, ``energy``, ``rd@0.05``, ``deletion``, ...)."""
        names: list[str] = []
        for group in self.metrics:
            if group in LOCALIZATION:
                names += [group] if localization else []
            elif group == "rd":
                names += [rd_name(k) for k in self.ks]
            else:
                names += list(CURVE_METRICS[group])
        return names


@dataclass
class BatchScores:
    """Per-image values of one batch: ``values[g][name]`` is ``(B,)`` for ``gammas[g]``; ``curves[g][mode]`` is
    ``(B, S + 1, 2)`` (``p_c``, ``p_d``) at the fractions ``fractions``."""

    values: list[dict[str, Tensor]] = field(default_factory=list)
    curves: list[dict[str, Tensor]] = field(default_factory=list)
    fractions: Tensor | None = None
    empty: list[Tensor] = field(default_factory=list)


def score_sweep(
    model: nn.Module,
    images: Tensor,
    sweep: SweepResult,
    options: ScoreOptions,
    regions: Tensor | None = None,
) -> BatchScores:
    """Score every gamma of ``sweep`` (maps of ``images``) with the metrics of ``options``.

    RD reuses the sweep's clean logits, so RD at ``len(options.ks)`` fractions costs ``len(ks)`` forward passes of
    the batch per gamma. ``regions`` (``(B, H, W)`` bool at input size) are the ground truth of the localization
    metrics; images without one should carry an all-false region and be masked out by the caller.
    """
    scores = BatchScores()
    wants = set(options.metrics)
    d = sweep.references[:, :1]
    for g in range(len(sweep.gammas)):
        maps = sweep.maps[g]
        values: dict[str, Tensor] = {}
        if regions is not None and "pointing" in wants:
            values["pointing"] = pointing_hits(maps, regions, options.tolerance).float()
        if regions is not None and "energy" in wants:
            values["energy"] = mask_energy(maps, regions).float()
        if "rd" in wants:
            drops = relative_confidence_drop(
                model, images, maps, sweep.targets, d, options.ks, options.input_fill, options.fill_mean,
                clean_logits=sweep.logits, blur_sigma=options.blur_sigma,
            )
            values.update({rd_name(k): drop for k, drop in drops.items()})
        curves: dict[str, Tensor] = {}
        for mode in ("deletion", "insertion"):
            if mode not in wants:
                continue
            curve = deletion_insertion(
                model, images, maps, sweep.targets, d, mode, options.steps, options.input_fill, options.fill_mean,
                batch_size=options.pass_size, blur_sigma=options.blur_sigma,
            )
            name, reference_name = CURVE_METRICS[mode]
            values[name], values[reference_name] = curve.target_auc, curve.reference_auc
            curves[mode] = torch.stack([curve.target, curve.reference], dim=-1)
            scores.fractions = curve.fractions
        scores.values.append(values)
        scores.curves.append(curves)
        scores.empty.append(maps.flatten(1).amax(dim=1) <= 0)
    return scores


def pixel_fill(
    fill: str | float, mean: Sequence[float] | None, std: Sequence[float] | None
) -> tuple[float, ...] | None:
    """For ``fill="zero"`` (black) or a number (a pixel value in ``[0, 1]``, e.g. 0.5 for grey): its value in the
    model's input space, ``(v - mean) / std`` per channel when the preprocessing normalises, else ``v`` (the model
    takes ``[0, 1]`` pixels, normalising inside or not); ``None`` for the other fills."""
    if isinstance(fill, str) and fill != "zero":
        return None
    value = 0.0 if isinstance(fill, str) else float(fill)
    if mean is None or std is None:
        return (value,) * 3
    return tuple((value - m) / s for m, s in zip(mean, std, strict=True))


def normalised_zero(model: nn.Module, preprocess_mean: Sequence[float] | None) -> tuple[float, ...] | None:
    """The input-space value that is zero in the model's normalised space: ``0`` when the preprocessing normalises,
    else the model's own ``mean`` buffer ``(1, 3, 1, 1)`` when it normalises internally, else ``None`` (unknown)."""
    if preprocess_mean is not None:
        return tuple(0.0 for _ in preprocess_mean)
    buffer = getattr(model, "mean", None)
    if isinstance(buffer, Tensor) and buffer.ndim == 4 and buffer.shape[1] in (1, 3) and buffer.numel() in (1, 3):
        return tuple(float(v) for v in buffer.flatten())
    return None
