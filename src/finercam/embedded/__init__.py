"""Embedded default models: a small CNN and a small ViT trained on :mod:`finercam.synth` birds, shipped in the package.

>>> from finercam.embedded import load_embedded
>>> cnn = load_embedded("cnn")        # doctest: +SKIP
>>> logits = cnn.model(images)        # doctest: +SKIP  images (B, 3, 64, 64) in [0, 1]; logits (B, 12)

The weights are ``weights/<name>.safetensors`` next to their model card ``weights/<name>.json`` (architecture and
config, parameter count, class names, data seeds, accuracies, training command, wall time, versions). Both are
produced by ``python -m finercam.embedded.train --model <name>``. Loading needs no network and no timm: only torch
and ``safetensors`` (core dependencies).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import load_file
from torch import nn

from finercam.embedded.architectures import build
from finercam.errors import InvalidArgumentError

EMBEDDED_MODELS: tuple[str, ...] = ("cnn", "vit")
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

__all__ = ["EMBEDDED_MODELS", "WEIGHTS_DIR", "EmbeddedModel", "load_embedded"]


@dataclass(frozen=True)
class EmbeddedModel:
    """An embedded model, ready to explain.

    Attributes:
        name: ``"cnn"`` or ``"vit"``.
        model: the classifier in eval mode: images ``(B, 3, H, W)`` in ``[0, 1]`` -> logits ``(B, 12)``. It normalises
            internally with its ``mean`` / ``std`` buffers.
        class_names: the class names in label order (those of :func:`finercam.synth.generate`'s default config).
        target_layer: dotted name of the explained layer: ``"stage3"`` (the CNN's last spatial stage, 16 x 16 at
            64 x 64) or ``"norm"`` (the ViT's final norm, the input of its linear head on the mean patch token: an
            8 x 8 token grid + CLS).
        mean, std: the internal normalisation, so "zero in normalised space" is filling with ``mean`` in pixel space.
        image_size: the training image size (64).
        card: the model card (parsed JSON).
    """

    name: str
    model: nn.Module
    class_names: tuple[str, ...]
    target_layer: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    image_size: int
    card: dict


def _check_name(name: object) -> str:
    if not isinstance(name, str) or name not in EMBEDDED_MODELS:
        raise InvalidArgumentError(f"unknown embedded model {name!r}; available: {', '.join(EMBEDDED_MODELS)}")
    return name


def load_embedded(name: str = "cnn", folder: str | Path | None = None) -> EmbeddedModel:
    """Load an embedded model (``"cnn"`` or ``"vit"``, see :data:`EMBEDDED_MODELS`) from the package, on CPU, or
    from ``folder``: the ``--out`` of ``python -m finercam.embedded.train`` (a retrained or variant model).

    Raises:
        InvalidArgumentError: unknown ``name``.
        FileNotFoundError: the weights are missing (train them with ``python -m finercam.embedded.train``).
    """
    name = _check_name(name)
    root = WEIGHTS_DIR if folder is None else Path(folder)
    weights, card_path = root / f"{name}.safetensors", root / f"{name}.json"
    if not weights.is_file() or not card_path.is_file():
        raise FileNotFoundError(
            f"the embedded model {name!r} is not installed: {weights} or {card_path} is missing; create them with "
            f"'python -m finercam.embedded.train --model {name}'"
        )
    card = json.loads(card_path.read_text())
    model = build(card["architecture"]["class"], card["architecture"]["config"])
    model.load_state_dict(load_file(weights), strict=True)
    model.eval()
    return EmbeddedModel(
        name=name,
        model=model,
        class_names=tuple(card["class_names"]),
        target_layer=card["target_layer"],
        mean=tuple(float(v) for v in card["mean"]),  # type: ignore[arg-type]
        std=tuple(float(v) for v in card["std"]),  # type: ignore[arg-type]
        image_size=int(card["image_size"]),
        card=card,
    )
