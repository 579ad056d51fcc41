r"""Faithfulness metrics: what happens to the model's confidence when the pixels a map ranks highest are removed.

* **RD@k**, the relative confidence drop (the Finer-CAM paper's headline metric): mask the top ``k`` of the map's
  pixels and compare how much the target's probability falls with how much the most similar reference's does,
  ``RD = (p_c - p^*_c) - (p_d - p^*_d)`` (``p`` before masking, ``p^*`` after; softmax probabilities). Masking
  pixels that tell ``c`` apart from ``d`` hurts ``c`` more than ``d``: higher is better.
* **Deletion** and **insertion** curves: remove (insert) pixels in the map's order, ``steps`` equal fractions at a
  time, and follow ``p_c`` and ``p_d`` (the paper's Fig. 5 shows both). The area under ``p_c``: lower is better for
  deletion, higher for insertion.

Every masked variant of a batch is built by broadcasting (no per-pixel loops) and goes through the model in large
batched forward passes without gradients, in eval mode as the explanations are (every module's train/eval flag is
restored afterwards): a model left in train mode would otherwise score the masked images with batch statistics and
update its BatchNorm buffers.

Fills (what removed pixels become), :data:`FILLS`:

* ``"mean"``: the per-channel ``mean`` of the model's input normalisation, i.e. zero in normalised space (pass
  ``mean=(0, 0, 0)`` when the images are already normalised); the common choice and the default.
* ``"zero"``: 0 in the space of ``images``.
* ``"image-mean"``: each image's own per-channel mean.
* ``"blur"``: the image blurred by a Gaussian of standard deviation ``blur_sigma`` pixels (RISE's insertion baseline).
* a number, or one value per channel.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from finercam.capture import batch_coupling, extract_logits, preserved_model
from finercam.errors import InvalidArgumentError

DEFAULT_KS = (0.05, 0.10)
FILLS = ("mean", "zero", "image-mean", "blur")
DEFAULT_STEPS = 20
DEFAULT_BLUR_SIGMA = 0.025  # as a fraction of the longer image side
Fill = str | float | Sequence[float] | Tensor


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


def pixel_ranks(maps: Tensor) -> Tensor:
    """``(B, H, W)`` long: each pixel's position when the map's pixels are sorted by decreasing value (0 = highest;
    ties in row-major order, as :func:`top_fraction_mask`)."""
    flat = maps.flatten(1)
    order = torch.sort(flat.float(), dim=1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(flat.shape[1], device=maps.device).expand_as(order))
    return ranks.view(maps.shape)


def _check_fraction(k: object) -> float:
    if isinstance(k, bool) or not isinstance(k, numbers.Real) or not 0 < float(k) <= 1:
        raise InvalidArgumentError(f"k must be a fraction of the pixels in (0, 1], e.g. 0.05; got {k!r}")
    return float(k)


def gaussian_blur(images: Tensor, sigma: float) -> Tensor:
    """``images`` blurred by a separable Gaussian of standard deviation ``sigma`` pixels (reflection padding)."""
    if sigma <= 0:
        return images
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = images.shape[1]
    padded = F.pad(images, (radius, radius, radius, radius), mode="reflect" if min(images.shape[-2:]) > radius
                   else "replicate")
    horizontal = kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1)
    vertical = kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1)
    return F.conv2d(F.conv2d(padded, horizontal, groups=channels), vertical, groups=channels)


def check_fill(fill: Fill, blur_sigma: float | None = None) -> None:
    """Raise :class:`InvalidArgumentError` unless ``fill`` is one of :data:`FILLS` or finite numbers, and
    ``blur_sigma`` is ``None`` (the default width) or a finite number of pixels > 0. A NaN or infinite fill makes
    every masked prediction NaN, and a blur of width 0 fills with the image itself (nothing is removed)."""
    if isinstance(fill, str):
        if fill not in FILLS:
            raise InvalidArgumentError(f"fill must be one of {list(FILLS)}, a number or one value per channel; "
                                       f"got {fill!r}")
    else:
        try:
            values = torch.as_tensor(fill, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            raise InvalidArgumentError(f"fill must be one of {list(FILLS)}, a number or one value per channel; "
                                       f"got {fill!r}") from None
        if not bool(values.isfinite().all()):
            raise InvalidArgumentError(f"a fill value must be a finite number (NaN or infinite pixels make every "
                                       f"masked prediction meaningless); got {fill!r}")
    if blur_sigma is not None and (isinstance(blur_sigma, bool) or not isinstance(blur_sigma, numbers.Real)
                                   or not math.isfinite(blur_sigma) or blur_sigma <= 0):
        raise InvalidArgumentError(f"blur_sigma must be a finite number of pixels > 0 (a blur of width 0 removes "
                                   f"nothing); got {blur_sigma!r}")


def fill_images(
    images: Tensor, fill: Fill = "mean", mean: Sequence[float] | Tensor | None = None,
    blur_sigma: float | None = None,
) -> Tensor:
    """What removed pixels become: a tensor broadcastable to ``images`` (see the module docstring for ``fill``).

    Args:
        blur_sigma: for ``fill="blur"``, in pixels > 0 (default ``0.025`` of the longer side).

    Raises:
        InvalidArgumentError: see :func:`check_fill`.
    """
    check_fill(fill, blur_sigma)
    if isinstance(fill, str):
        if fill == "image-mean":
            return images.mean(dim=(2, 3), keepdim=True)
        if fill == "blur":
            sigma = DEFAULT_BLUR_SIGMA * max(images.shape[-2:]) if blur_sigma is None else float(blur_sigma)
            return gaussian_blur(images, sigma)
        if fill == "zero":
            value: Tensor | float | Sequence[float] = 0.0
        elif mean is None:
            raise InvalidArgumentError(
                "fill='mean' needs mean=: the per-channel mean of the model's input normalisation (pixels filled "
                "with it are zero in normalised space; give 0 when the images are already normalised)"
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


def _check_maps(images: Tensor, maps: Tensor) -> None:
    if images.ndim != 4 or maps.ndim != 3 or maps.shape[0] != images.shape[0] or maps.shape[1:] != images.shape[2:]:
        raise InvalidArgumentError(
            f"maps must be (B, H, W) at the images' resolution; got maps {tuple(maps.shape)} for images "
            f"{tuple(images.shape)} (upsample layer-resolution maps first)"
        )


def _pairs(targets: Tensor, references: Tensor, batch: int, device: torch.device) -> Tensor:
    """``(B, 2)``: the target ``c`` and the most similar reference ``d`` (first of each row) of every image."""
    targets = torch.as_tensor(targets, device=device).long().reshape(-1)
    references = torch.as_tensor(references, device=device).long()
    reference = (references[:, 0] if references.ndim == 2 else references).reshape(-1)
    if targets.shape[0] != batch or reference.shape[0] != batch:
        raise InvalidArgumentError(f"give one target and one reference row per image ({batch} images)")
    if bool((reference < 0).any()):
        raise InvalidArgumentError("these metrics need a reference class for every image; some rows have none (-1)")
    return torch.stack([targets, reference], dim=1)


def _pair_probabilities(model: nn.Module, images: Tensor, pair: Tensor, batch_size: int | None) -> Tensor:
    """``(N, 2)`` softmax probabilities of ``pair``'s classes, ``pair`` repeated over the ``N / B`` variants (one
    variant per pass for a model whose eval forward mixes a batch: :func:`finercam.capture.batch_coupling`)."""
    size = images.shape[0] if batch_size is None else batch_size
    if batch_coupling(model):
        size = 1
    rows = pair.repeat(images.shape[0] // pair.shape[0], 1)
    chunks = [
        torch.softmax(extract_logits(model(images[i : i + size])).float(), dim=1).gather(1, rows[i : i + size])
        for i in range(0, images.shape[0], size)
    ]
    return torch.cat(chunks)


def relative_confidence_drop(
    model: nn.Module,
    images: Tensor,
    maps: Tensor,
    targets: Tensor,
    references: Tensor,
    ks: Sequence[float] = DEFAULT_KS,
    fill: Fill = "mean",
    mean: Sequence[float] | Tensor | None = None,
    *,
    clean_logits: Tensor | None = None,
    blur_sigma: float | None = None,
) -> dict[float, Tensor]:
    r"""RD@k of every image: ``(p_c - p^*_c) - (p_d - p^*_d)`` after masking the top ``k`` of its map's pixels.

    For each ``k`` all masked images go through the model in one batched forward pass, so RD at two fractions costs
    at most three passes (one clean, unless ``clean_logits`` is given, and one per ``k``).

    Args:
        model: the classifier, taking ``images`` and returning logits ``(B, C)`` (or a tuple / ``.logits``).
        images: ``(B, C, H, W)`` the model's inputs.
        maps: ``(B, H, W)`` saliency maps at input resolution (e.g. ``result.maps``).
        targets: ``(B,)`` the explained classes ``c``.
        references: ``(B, T)`` or ``(B,)`` reference classes; ``d`` is the first (most similar) of each row.
        ks: fractions of the pixels to mask, each in ``(0, 1]``; ``round(k * H * W)`` pixels (at least one), ties
            broken as in :func:`top_fraction_mask`.
        fill, mean, blur_sigma: what masked pixels become (module docstring).
        clean_logits: ``(B, C)`` logits of the unmasked images, if already known (e.g. ``result.logits``).

    Returns:
        ``{k: (B,) RD@k}`` in the order of ``ks``.
    """
    _check_maps(images, maps)
    fractions = [_check_fraction(k) for k in ks]
    pair = _pairs(targets, references, images.shape[0], images.device)
    value = fill_images(images, fill, mean, blur_sigma)
    with torch.no_grad(), preserved_model(model):
        clean = (
            _pair_probabilities(model, images, pair, None) if clean_logits is None
            else torch.softmax(clean_logits.float(), dim=1).gather(1, pair.to(clean_logits.device))
        ).to(images.device)
        drops: dict[float, Tensor] = {}
        for k in fractions:
            masked = torch.where(top_fraction_mask(maps.to(images.device), k)[:, None], value, images)
            drop = clean - _pair_probabilities(model, masked, pair, None)
            drops[k] = drop[:, 0] - drop[:, 1]
    return drops


@dataclass(frozen=True)
class Curves:
    """Deletion or insertion curves of a batch.

    Attributes:
        mode: ``"deletion"`` or ``"insertion"``.
        fractions: ``(S + 1,)`` the share of pixels removed (deletion) or inserted (insertion) at each step.
        target: ``(B, S + 1)`` ``p_c`` at each step. reference: ``(B, S + 1)`` ``p_d`` at each step.
    """

    mode: str
    fractions: Tensor
    target: Tensor
    reference: Tensor

    @property
    def target_auc(self) -> Tensor:
        """``(B,)`` area under ``p_c`` over ``[0, 1]`` (trapezoidal rule)."""
        return torch.trapezoid(self.target, self.fractions.to(self.target), dim=1)

    @property
    def reference_auc(self) -> Tensor:
        """``(B,)`` area under ``p_d``."""
        return torch.trapezoid(self.reference, self.fractions.to(self.reference), dim=1)


CURVE_MODES = ("deletion", "insertion")


def deletion_insertion(
    model: nn.Module,
    images: Tensor,
    maps: Tensor,
    targets: Tensor,
    references: Tensor,
    mode: str = "deletion",
    steps: int = DEFAULT_STEPS,
    fill: Fill = "mean",
    mean: Sequence[float] | Tensor | None = None,
    *,
    batch_size: int | None = None,
    blur_sigma: float | None = None,
) -> Curves:
    """Deletion or insertion curves of ``p_c`` and ``p_d`` (``d`` the first reference of each row).

    Step ``s`` of ``steps`` removes (deletion: the pixels become the fill) or inserts (insertion: start from the fill,
    the pixels get their values back) the ``round(s / steps * H * W)`` highest pixels of the map, ties broken as in
    :func:`top_fraction_mask`. The ``B * (steps + 1)`` variants are built by broadcasting and go through the model
    in passes of about ``batch_size`` images (whole steps of the batch; default ``B``: one pass per step).
    """
    if mode not in CURVE_MODES:
        raise InvalidArgumentError(f"mode must be one of {list(CURVE_MODES)}; got {mode!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InvalidArgumentError(f"steps must be a whole number >= 1; got {steps!r}")
    _check_maps(images, maps)
    batch, pixels = images.shape[0], images.shape[-2] * images.shape[-1]
    pair = _pairs(targets, references, batch, images.device)
    value = fill_images(images, fill, mean, blur_sigma).expand_as(images)
    ranks = pixel_ranks(maps.to(images.device))
    fractions = torch.linspace(0, 1, steps + 1, device=images.device)
    counts = (fractions * pixels).round().long()
    per_pass = max(1, (batch if batch_size is None else batch_size) // batch)  # steps per forward pass
    probabilities = []
    with torch.no_grad(), preserved_model(model):
        for first in range(0, steps + 1, per_pass):  # batched passes over several steps, never one per pixel
            chosen = counts[first : first + per_pass]
            selected = (ranks[None] < chosen[:, None, None, None])[:, :, None]  # (s, B, 1, H, W)
            kept, filled = (images, value) if mode == "deletion" else (value, images)
            variants = torch.where(selected, filled, kept).flatten(0, 1)
            probabilities.append(_pair_probabilities(model, variants, pair, None).view(len(chosen), batch, 2))
    stacked = torch.cat(probabilities).transpose(0, 1)  # (B, S + 1, 2)
    return Curves(mode, fractions.cpu(), stacked[..., 0], stacked[..., 1])
