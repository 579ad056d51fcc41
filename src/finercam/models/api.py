"""``load_model`` and ``load_backbone``: any model a user has, from a specification string.

See :mod:`finercam.models.spec` for the specification forms. Every model comes back in eval mode with frozen
parameters, on the requested device, with its preprocessing and (when known) class names.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from finercam.errors import InvalidArgumentError, InvalidTypeError, ModelLoadError, ModelOutputError
from finercam.models import (
    embedded_loader,
    file_loaders,
    hf_loader,
    open_clip_loader,
    timm_loader,
    torchvision_loader,
)
from finercam.models.heads import BACKBONE_WEIGHTS, PLAIN_FORMAT, BackboneWithHead, load_head
from finercam.models.parts import BackboneParts, ClassifierParts
from finercam.models.pooling import POOLING_MODES, PooledFeatures, build_features, resolve_pooling
from finercam.models.preprocess import PREPROCESS_PRESETS, Preprocess, get_preprocess
from finercam.models.spec import ModelSpec, parse_spec
from finercam.models.weights import existing_file
from finercam.runtime import resolve_device


@dataclass(frozen=True)
class LoadedModel:
    """A classifier ready to explain.

    Attributes:
        model: eval mode, frozen; ``model(images)`` returns logits ``(B, C)`` or an output with ``.logits``.
        preprocess: PIL image -> normalised ``(3, H, W)`` tensor.
        class_names: the ``C`` class names, when known.
        spec: the specification it was loaded from.
        target_layer: a layer the loader recommends (e.g. ``backbone.blocks.-1.norm1``), or ``None`` for "auto".
    """

    model: nn.Module
    preprocess: Preprocess
    class_names: tuple[str, ...] | None
    spec: str
    target_layer: str | None


@dataclass(frozen=True)
class LoadedBackbone:
    """A frozen feature extractor: ``features(images)`` returns pooled features ``(B, dim)``.

    Attributes:
        pooling: the pooling mode actually used (``auto`` resolved), to store with a head trained on it.
    """

    features: nn.Module
    dim: int
    preprocess: Preprocess
    spec: str
    pooling: str = "pooled"


def _weights_path(spec: ModelSpec, weights: str | Path | None) -> Path | None:
    if weights is not None and spec.weights is not None:
        raise InvalidArgumentError(
            f"weights given twice: {spec.text!r} names {spec.weights!r} and weights={str(weights)!r}; keep one"
        )
    chosen = weights if weights is not None else spec.weights
    return existing_file(chosen, "weights file") if chosen is not None else None


def _check_num_classes(num_classes: object) -> int | None:
    if num_classes is None:
        return None
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise InvalidArgumentError(f"num_classes must be a positive int; got {num_classes!r}")
    return num_classes


def _finish(model: nn.Module, device: torch.device) -> nn.Module:
    model = model.to(device)
    model.eval()
    for parameter in model.parameters():  # not model.requires_grad_(): TorchScript modules lack it
        parameter.requires_grad_(False)
    return model


def _generic_parts(module: nn.Module, preprocess: Preprocess, what: str) -> BackboneParts:
    """A module that maps images to ``(B, D)`` features itself; ``D`` from one small forward pass."""
    height, width = preprocess.fixed_size or (224, 224)
    with torch.no_grad():
        try:
            output = module.eval()(torch.zeros(1, 3, height, width))
        except Exception as error:
            raise ModelLoadError(f"{what} fails on a {height}x{width} input: {type(error).__name__}: {error}") from None
    output = output[0] if isinstance(output, tuple | list) else output
    if not isinstance(output, torch.Tensor) or output.ndim != 2:
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise ModelOutputError(f"{what} returns {shape}; a backbone must return pooled features (B, D)")
    return BackboneParts(module, "call", {"pooled": int(output.shape[1])}, "pooled", preprocess)


def _backbone_parts(spec: ModelSpec, weights: Path | None, preprocess: Preprocess | None) -> BackboneParts:
    if spec.kind == "timm":
        return timm_loader.load_backbone(spec.name, weights, preprocess)
    if spec.kind == "torchvision":
        return torchvision_loader.load_backbone(spec.name, weights)
    if spec.kind == "hf":
        return hf_loader.load_backbone(spec.name, weights, preprocess)
    if spec.kind == "open_clip":
        return open_clip_loader.load_backbone(spec.name, weights)
    if spec.kind == "embedded":
        raise InvalidArgumentError(
            f"{spec.text!r} is a finished classifier, not a feature backbone: it takes no head (--head / head=), "
            "and train-probe needs another backbone"
        )
    if spec.kind == "torchscript":
        loaded = file_loaders.load_torchscript(spec.name, weights)
    else:
        assert spec.factory is not None
        loaded = file_loaders.load_python(spec.name, spec.factory, weights, None)
    return _generic_parts(loaded.model, preprocess or loaded.preprocess, spec.text)


def _build_backbone(
    spec: str, weights: str | Path | None, preprocess: str | Preprocess | None, pooling: str, head_dim: int | None
) -> tuple[PooledFeatures, Preprocess | None, BackboneParts]:
    if not isinstance(pooling, str) or pooling not in POOLING_MODES:
        raise InvalidArgumentError(f"unknown pooling {pooling!r}; use one of {list(POOLING_MODES)}")
    parsed = parse_spec(spec)
    chosen = get_preprocess(preprocess) if preprocess is not None else None
    parts = _backbone_parts(parsed, _weights_path(parsed, weights), chosen)
    mode = resolve_pooling(parts, pooling, head_dim, spec)
    return build_features(parts, mode), chosen, parts


def load_backbone(
    spec: str,
    *,
    weights: str | Path | None = None,
    preprocess: str | Preprocess | None = None,
    pooling: str = "auto",
    device: str | torch.device = "cpu",
) -> LoadedBackbone:
    """Load a frozen feature backbone.

    Args:
        spec: a model specification (``timm:vit_base_patch14_dinov2``, ``hf:./dinov2-base``, ...).
        weights: a checkpoint for the backbone (safetensors or a ``torch.save`` state dict).
        preprocess: a preset name or a :class:`Preprocess`; default: the model's own configuration.
        pooling: ``auto``, ``mean-patch``, ``cls`` or ``pooled`` (see :mod:`finercam.models.pooling`).
        device: where to put it.

    Raises:
        FinerCAMError: a subclass naming what is wrong (unknown kind or name, missing file, mismatched weights, a
            missing optional dependency ...).
    """
    target = resolve_device(device)
    features, chosen, parts = _build_backbone(spec, weights, preprocess, pooling, None)
    _finish(features, target)
    return LoadedBackbone(features, features.dim, chosen or parts.preprocess, spec, features.pooling.mode)


def _classifier(
    spec: ModelSpec, weights: Path | None, num_classes: int | None, pre: Preprocess | None
) -> ClassifierParts:
    if spec.kind == "timm":
        return timm_loader.load_classifier(spec.name, weights, num_classes, pre)
    if spec.kind == "torchvision":
        return torchvision_loader.load_classifier(spec.name, weights, num_classes)
    if spec.kind == "hf":
        return hf_loader.load_classifier(spec.name, weights, num_classes, pre)
    if spec.kind == "open_clip":
        raise InvalidArgumentError(
            f"{spec.text!r} is an image-text model without classes; add a linear head on its image features with "
            "head=FILE (train one with 'finercam train-probe')"
        )
    if num_classes is not None and spec.kind in ("torchscript", "embedded"):
        raise InvalidArgumentError(f"num_classes cannot change a {spec.kind} model; leave it out")
    if spec.kind == "embedded":
        if weights is not None:
            raise InvalidArgumentError(
                f"{spec.text!r} ships its own weights; leave out the weights file (--weights / weights=)"
            )
        return embedded_loader.load_classifier(spec.name)
    if spec.kind == "torchscript":
        return file_loaders.load_torchscript(spec.name, weights)
    assert spec.factory is not None
    return file_loaders.load_python(spec.name, spec.factory, weights, num_classes)


def _check_head_backbone(
    head: str | Path, metadata: dict[str, str], spec: str, weights: str | Path | None
) -> None:
    """Warn when a head meets another backbone than it was trained on: another architecture (the same one named with
    its checkpoint inline, ``timm:resnet18@w.pth``, or with ``weights=``, is the same), or, for heads that record it,
    other weights (their SHA-256)."""
    from finercam.fingerprint import file_fingerprint

    stored = metadata.get("backbone")
    parsed = parse_spec(spec)
    if stored:
        try:
            trained = parse_spec(stored)
            same = (trained.kind, trained.name, trained.factory) == (parsed.kind, parsed.name, parsed.factory)
        except InvalidArgumentError:
            same = stored == spec
        if not same:
            warnings.warn(f"head {str(head)!r} was trained on {stored!r}, not {spec!r}", stacklevel=4)
            return
    digest = metadata.get(BACKBONE_WEIGHTS)
    file = weights if weights is not None else parsed.weights
    if digest and file is None:
        warnings.warn(f"head {str(head)!r} was trained on a backbone weights file (sha256 {digest[:12]}...), but no "
                      "weights file is given: the features are not the ones it was trained on", stacklevel=4)
    elif digest and file is not None and file_fingerprint(file)["sha256"] != digest:
        warnings.warn(f"head {str(head)!r} was trained on other backbone weights (sha256 {digest[:12]}...) than "
                      f"{str(file)!r}: its classes may not mean what they say on these features", stacklevel=4)


def _with_head(
    spec: str, weights: str | Path | None, head: str | Path, preprocess: str | Preprocess | None,
    num_classes: int | None, device: torch.device,
) -> LoadedModel:
    linear, names, metadata = load_head(head)
    if num_classes is not None and num_classes != linear.out_features:
        raise InvalidArgumentError(f"num_classes={num_classes} but the head {str(head)!r} has {linear.out_features}")
    pooling = metadata.get("pooling", "auto")
    if pooling not in POOLING_MODES:
        raise InvalidArgumentError(f"head {str(head)!r} names an unknown pooling {pooling!r} in its metadata")
    stored = metadata.get("preprocess")
    if preprocess is None and isinstance(stored, str):  # a preset the head was trained with ("imagenet@32")
        with contextlib.suppress(InvalidArgumentError):  # else a description of the backbone's own preprocessing
            preprocess = get_preprocess(stored)
    features, chosen, parts = _build_backbone(spec, weights, preprocess, pooling, linear.in_features)
    official = metadata.get("format") == PLAIN_FORMAT and parts.family == "dinov2"
    if chosen is None and official and features.pooling.mode == "mean-patch":
        chosen = PREPROCESS_PRESETS["dinov2-official"]  # the official Finer-CAM heads, as its code feeds them
    _check_head_backbone(head, metadata, spec, weights)
    model = _finish(BackboneWithHead(features, linear), device)
    return LoadedModel(model, chosen or parts.preprocess, names, spec, model.target_layer)  # type: ignore[arg-type]


def load_model(
    spec: str,
    *,
    weights: str | Path | None = None,
    head: str | Path | None = None,
    preprocess: str | Preprocess | None = None,
    num_classes: int | None = None,
    device: str | torch.device = "cpu",
) -> LoadedModel:
    """Load a classifier to explain.

    Args:
        spec: a model specification (see :mod:`finercam.models.spec`).
        weights: a checkpoint for the model (for a ``head``, for its backbone).
        head: a linear head file (:func:`~finercam.models.save_head`, or a plain ``nn.Linear`` state dict such as
            the official Finer-CAM ``classifier_weight/*.pth``); the model is then
            :class:`~finercam.models.BackboneWithHead` and the class names come from the head. A plain head on a
            DINOv2 backbone uses mean-patch pooling and the ``dinov2-official`` preprocessing unless told otherwise.
        preprocess: a preset name or a :class:`Preprocess`; default: the head's stored preset, else the model's own
            configuration.
        num_classes: the number of classes of a torchvision / timm / python-factory architecture (default: read from
            the checkpoint).
        device: where to put the model.

    Raises:
        FinerCAMError: a subclass naming what is wrong.
    """
    target = resolve_device(device)
    num_classes = _check_num_classes(num_classes)
    if head is not None:
        if not isinstance(head, str | Path):
            raise InvalidTypeError(f"head must be a path to a head file; got {type(head).__name__}")
        return _with_head(spec, weights, head, preprocess, num_classes, target)
    parsed = parse_spec(spec)
    chosen = get_preprocess(preprocess) if preprocess is not None else None
    parts = _classifier(parsed, _weights_path(parsed, weights), num_classes, chosen)
    model = _finish(parts.model, target)
    return LoadedModel(model, chosen or parts.preprocess, parts.class_names, spec, parts.target_layer)
