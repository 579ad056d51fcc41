"""What the library-specific loaders return to :mod:`finercam.models.api`."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from finercam.models.preprocess import Preprocess


@dataclass
class ClassifierParts:
    """A classifier built by a library-specific loader.

    Attributes:
        model: the network, returning logits or an output with ``.logits``.
        preprocess: its own preprocessing.
        class_names: from the checkpoint or config, when known.
        target_layer: a recommended CAM layer, when known.
    """

    model: nn.Module
    preprocess: Preprocess
    class_names: tuple[str, ...] | None = None
    target_layer: str | None = None


@dataclass
class BackboneParts:
    """What a library-specific loader found out about a backbone.

    Attributes:
        module: the network.
        library: see :class:`finercam.models.pooling.Pooling`.
        dims: feature size per available pooling mode.
        auto: the mode ``auto`` stands for.
        preprocess: the backbone's own preprocessing.
        family: ``dinov2``, ``clip`` or ``""``.
    """

    module: nn.Module
    library: str
    dims: dict[str, int]
    auto: str
    preprocess: Preprocess
    num_prefix_tokens: int | None = None
    patch_size: int | None = None
    target_layer: str | None = None
    channels_last: bool = False
    projected: bool = False
    family: str = ""
