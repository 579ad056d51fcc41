"""A labelled figure of concept maps: the image, the plain concept map and the contrast, one row per image."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from finercam.concepts.api import ConceptExplanation
from finercam.errors import InvalidArgumentError
from finercam.methods import get_method


def _resized(maps: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(maps.shape[-2:]) == size:
        return maps.detach().cpu().float()
    return F.interpolate(maps[:, None].detach().cpu().float(), size=size, mode="bilinear", align_corners=False)[:, 0]


def versus_label(explanation: ConceptExplanation) -> str:
    """``'red beak' − 0.6·'bird'`` (the mean of several references is written ``mean('a', 'b')``)."""
    quoted = ", ".join(f"'{prompt}'" for prompt in explanation.versus)
    references = quoted if len(explanation.versus) == 1 else f"mean({quoted})"
    return f"'{explanation.concept}' − {explanation.gamma:g}·{references}"


def save_concept_figure(path: str | Path, display: Tensor, explanation: ConceptExplanation,
                        panel_inches: float = 3.0) -> Path:
    """Save image | plain concept map | contrast map for every image; returns the path written.

    Args:
        path: the figure file (``.png``, ``.pdf``, ``.svg``).
        display: ``(B, 3, H, W)`` or ``(3, H, W)`` images in ``[0, 1]`` to draw on (maps are resized to them).
        explanation: from :func:`~finercam.concepts.api.explain_concepts`.
    """
    from finercam import viz

    images = display[None] if display.ndim == 3 else display
    count = int(explanation.concept_maps.shape[0])
    if images.ndim != 4 or images.shape[0] != count or images.shape[1] != 3:
        raise InvalidArgumentError(
            f"display has shape {tuple(display.shape)}; the explanation has {count} image(s): give (3, H, W) for one "
            f"image or ({count}, 3, H, W), one picture per explained image"
        )
    size = (int(images.shape[-2]), int(images.shape[-1]))
    similarities = explanation.similarities.detach().cpu()
    prompts = (explanation.concept, *explanation.versus)
    image_captions = [", ".join(f"cos '{p}' {float(s):.2f}" for p, s in zip(prompts, row, strict=True))
                      for row in similarities]
    raw = explanation.contrast_raw_maps.detach().cpu()
    contrast_captions = [
        "all negative: nothing the concept adds" if float(r.max()) <= 0 else f"vs {', '.join(explanation.versus)}"
        for r in raw
    ]
    title = get_method(explanation.result.method).title
    columns = [
        viz.Column("image", captions=_wrapped(image_captions)),
        viz.Column(f"{title}: '{explanation.concept}'", _resized(explanation.concept_maps, size),
                   captions=["plain concept (γ = 0)"] * len(images)),
        viz.Column(f"Finer-CAM: {versus_label(explanation)}", _resized(explanation.contrast_maps, size),
                   captions=contrast_captions),
    ]
    return viz.save_comparison(path, torch.as_tensor(images).detach().cpu(), columns, panel_inches=panel_inches)


def _wrapped(captions: list[str], width: int = 44) -> list[str]:
    """Captions broken after a comma when longer than ``width`` characters."""
    lines = []
    for caption in captions:
        parts, current = [], ""
        for piece in caption.split(", "):
            candidate = f"{current}, {piece}" if current else piece
            if len(candidate) > width and current:
                parts.append(current)
                candidate = piece
            current = candidate
        parts.append(current)
        lines.append("\n".join(parts))
    return lines
