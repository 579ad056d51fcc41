"""``torchvision:NAME`` models: random weights unless a weights file is given (torchvision downloads are never used).

The number of classes is read from the checkpoint's classifier when ``num_classes`` is not given. The default
preprocessing is the one torchvision's own weights for that architecture declare (resize, crop, interpolation),
which is available offline; ImageNet names are attached when a 1000-class checkpoint is loaded.
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType

from torch import nn

from finercam.errors import InvalidArgumentError, ModelNotFoundError, RandomWeightsWarning
from finercam.models._deps import require
from finercam.models.parts import BackboneParts, ClassifierParts
from finercam.models.preprocess import IMAGENET_MEAN, IMAGENET_STD, PREPROCESS_PRESETS, Preprocess, with_name
from finercam.models.weights import classifier_rows, last_linear_name, load_into, read_state_dict


def _tv() -> ModuleType:
    return require("torchvision", "torchvision: model specs")


_TASKS = {"detection": "an object-detection", "segmentation": "a segmentation", "video": "a video",
          "optical_flow": "an optical-flow", "quantization": "a quantized"}


def _check_name(tv: ModuleType, name: str) -> None:
    """Refuse a name torchvision does not have, or one of its models that is not an image classifier (detection,
    segmentation, video, optical flow, quantized: they take other inputs, and would download backbone weights)."""
    names = tv.models.list_models(module=tv.models)
    if name in names:
        return
    for task, kind in _TASKS.items():
        module = getattr(tv.models, task, None)
        if module is not None and name in tv.models.list_models(module=module):
            raise InvalidArgumentError(
                f"torchvision's {name!r} is {kind} model, not an image classifier; finercam "
                "explains classifiers (torchvision.models.list_models(module=torchvision.models) lists them)"
            )
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.6)
    hint = f"; close names: {close}" if close else ""
    raise ModelNotFoundError(
        f"torchvision has no model {name!r}{hint}. All names: torchvision.models.list_models(module=torchvision.models)"
    )


def _default_weights(tv: ModuleType, name: str) -> object | None:
    try:
        return tv.models.get_model_weights(name).DEFAULT
    except (ValueError, AttributeError, KeyError):
        return None


def _side(value: object, default: int) -> int:
    value = default if value is None else value
    return int(value[0] if isinstance(value, list | tuple) else value)  # type: ignore[arg-type, index]


def _preprocess(tv: ModuleType, name: str, model: nn.Module | None = None) -> Preprocess:
    """The evaluation transform declared by torchvision's default weights for ``name``; for a model with a fixed
    input size (a ViT's ``image_size``) that the default weights do not have (``vit_h_14``'s DEFAULT is SWAG at 518
    px; the model built without weights takes 224), the transform of its weights of that size."""
    default = _default_weights(tv, name)
    size = getattr(model, "image_size", None)
    if isinstance(size, int) and default is not None:
        sized = [weights for weights in tv.models.get_model_weights(name)
                 if _side(getattr(getattr(weights, "transforms", None), "keywords", {}).get("crop_size"), 224) == size]
        default = default if default in sized or not sized else sized[0]
    keywords = getattr(getattr(default, "transforms", None), "keywords", None)
    if not isinstance(keywords, dict):
        return with_name(PREPROCESS_PRESETS["imagenet"], f"imagenet (torchvision default for {name})")
    crop = _side(keywords.get("crop_size"), 224)
    resize = _side(keywords.get("resize_size"), 256)
    interpolation = getattr(keywords.get("interpolation"), "value", "bilinear")
    return Preprocess(
        f"torchvision preset of {name}", resize=resize, crop=(crop, crop),
        interpolation=interpolation if interpolation in ("nearest", "bilinear", "bicubic") else "bilinear",
        mean=tuple(keywords.get("mean", IMAGENET_MEAN)), std=tuple(keywords.get("std", IMAGENET_STD)),
    )


def _random_warning(name: str) -> None:
    warnings.warn(
        f"torchvision model {name!r} has random weights (no weights file given); pass weights=FILE or "
        f"torchvision:{name}@FILE to explain a trained model",
        RandomWeightsWarning,
        stacklevel=4,
    )


_AUXILIARY = {"googlenet": "aux1", "inception_v3": "AuxLogits"}
"""The auxiliary classifiers of models trained with them: a checkpoint saved without them (``aux_logits=False``, as
torchvision's own pretrained weights are) is loaded into a model built without them."""


def _build(tv: ModuleType, name: str, state: Mapping[str, object] | None, **kwargs: object) -> nn.Module:
    auxiliary = _AUXILIARY.get(name)
    if auxiliary is not None:
        kwargs.setdefault("init_weights", True)  # their default initialisation (torchvision warns of a change)
        if state is not None and not any(f".{auxiliary}." in f".{key}" for key in state):
            kwargs["aux_logits"] = False
    return tv.models.get_model(name, weights=None, **kwargs)


def load_classifier(name: str, weights: Path | None, num_classes: int | None) -> ClassifierParts:
    """A torchvision classifier, its classes inferred from the checkpoint when not given."""
    tv = _tv()
    _check_name(tv, name)
    kwargs = {"num_classes": num_classes} if num_classes is not None else {}
    state = read_state_dict(weights) if weights is not None else None
    model = _build(tv, name, state, **kwargs)
    names = None
    if weights is None or state is None:
        _random_warning(name)
    else:
        linear = last_linear_name(model)
        rows = classifier_rows(state, f"{linear}.weight") if linear else None
        if num_classes is None and rows is not None and rows != model.get_submodule(linear).out_features:
            model = _build(tv, name, state, num_classes=rows)
        given = f"num_classes={num_classes} was given; leave it out to use the checkpoint's" if num_classes else ""
        load_into(model, state, f"weights file {str(weights)!r}", classifier=linear, hint=given)
        head = model.get_submodule(linear) if linear else None
        default = _default_weights(tv, name)
        categories = getattr(default, "meta", {}).get("categories")
        if isinstance(head, nn.Linear) and categories and len(categories) == head.out_features:
            names = tuple(categories)
    return ClassifierParts(model, _preprocess(tv, name, model), names, None)


def load_backbone(name: str, weights: Path | None) -> BackboneParts:
    """A torchvision model whose last ``nn.Linear`` (the classifier) is replaced by ``nn.Identity``."""
    tv = _tv()
    _check_name(tv, name)
    state = read_state_dict(weights) if weights is not None else None
    auxiliary = _AUXILIARY.get(name)
    model = _build(tv, name, {} if auxiliary else state)  # features need no auxiliary classifier
    linear = last_linear_name(model)
    if linear is None:
        raise ModelNotFoundError(f"torchvision model {name!r} has no nn.Linear classifier to remove")
    in_features = model.get_submodule(linear).in_features
    parent, _, child = linear.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, nn.Identity())
    if weights is None or state is None:
        _random_warning(name)
    else:
        load_into(
            model, state, f"weights file {str(weights)!r}",
            ignore_unexpected=lambda key: key.startswith(f"{linear}.") or (
                auxiliary is not None and f".{auxiliary}." in f".{key}"
            ),
        )
    return BackboneParts(model, "call", {"pooled": in_features}, "pooled", _preprocess(tv, name, model))
