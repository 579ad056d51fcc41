"""``hf:ID_OR_DIR`` models from transformers, loaded with ``local_files_only=True`` (never downloaded).

Classifiers (``*ForImageClassification``) load with ``AutoModelForImageClassification``; their class names come from
``config.id2label``. Backbones: DINOv2 (``Dinov2Model``, with or without registers), CLIP's image tower (from a
``CLIPModel`` or ``CLIPVisionModel[WithProjection]`` checkpoint; the projection is kept so ``pooled`` gives CLIP's
``image_embeds``) and, generically, ``AutoModel``. Weights that would be left randomly initialised are an error.
Preprocessing comes from ``preprocessor_config.json`` (the directory or the cache), else from the config, with a
warning.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

from torch import nn

from finercam.errors import (
    InvalidArgumentError,
    ModelFileNotFoundError,
    ModelLoadError,
    ModelNotFoundError,
    WeightsError,
)
from finercam.models._deps import quiet_loading, require
from finercam.models.configs import from_hf_processor as _from_processor
from finercam.models.parts import BackboneParts, ClassifierParts
from finercam.models.preprocess import CLIP_MEAN, CLIP_STD, HALF, IMAGENET_MEAN, IMAGENET_STD, Preprocess
from finercam.models.weights import load_into, read_state_dict

_FAMILIES = {"dinov2": "dinov2", "dinov2_with_registers": "dinov2", "clip": "clip", "clip_vision_model": "clip"}
_TOKEN_TYPES = {"dinov2", "dinov2_with_registers", "clip", "clip_vision_model", "vit", "deit"}
_LAYER_CANDIDATES = (
    "encoder.layer.-1.norm1", "encoder.layers.-1.norm1", "layers.-1.norm1",
    "vision_model.encoder.layers.-1.layer_norm1",
    "encoder.layer.-1.layernorm_before", "encoder.layers.-1.layernorm_before", "layers.-1.layernorm_before",
)


def _transformers() -> ModuleType:
    return require("transformers", "hf: model specs")


def resolve_source(name: str) -> str:
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelFileNotFoundError(
                f"hf:{name}: the directory has no config.json; expected a directory written by save_pretrained()"
            )
        return str(path)
    if path.exists():
        raise InvalidArgumentError(
            f"hf:{name} is a file; hf: takes a directory written by save_pretrained() or a hub id. For a weights "
            "file use weights=FILE with an architecture spec"
        )
    if name.startswith(("/", ".", "~")) or name.count("/") > 1:
        raise ModelFileNotFoundError(f"hf:{name}: directory {name!r} does not exist")
    return name


def load_config(tf: ModuleType, source: str, name: str) -> object:
    try:
        return tf.AutoConfig.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelNotFoundError(
            f"hf:{name} is neither a local directory nor a model in the local Hugging Face cache (nothing is "
            f"downloaded; copy the model with save_pretrained or `huggingface-cli download` first): {first}"
        ) from None


def _check_loading(info: dict, name: str, allowed_missing: str | None = None) -> set[str]:
    missing = set(info.get("missing_keys") or ())
    mismatched = info.get("mismatched_keys") or ()
    tolerated = {key for key in missing if allowed_missing and key.startswith(allowed_missing)}
    if missing - tolerated or mismatched:
        shown = sorted(missing - tolerated)[:5] or list(mismatched)[:5]
        raise WeightsError(
            f"hf:{name}: the checkpoint lacks weights the model needs (they would be random): {shown}"
        )
    return tolerated


def _processor_settings(source: str) -> dict | None:
    file: Path | None = Path(source) / "preprocessor_config.json"
    if not Path(source).is_dir():
        file = None
        try:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(source, "preprocessor_config.json")
            file = Path(found) if isinstance(found, str) else None
        except ImportError:
            pass
    if file is None or not file.is_file():
        return None
    try:
        settings = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return settings if isinstance(settings, dict) else None


def config_preprocess(source: str, name: str, config: object, family: str, given: Preprocess | None) -> Preprocess:
    if given is not None:
        return given
    settings = _processor_settings(source)
    if settings is not None:
        return _from_processor(settings, f"hf:{name}")
    vision = getattr(config, "vision_config", None) or config
    size = getattr(vision, "image_size", 224)
    size = int(size[0] if isinstance(size, list | tuple) else size)
    if family == "dinov2":  # what facebook/dinov2-* ship
        chosen = Preprocess(f"config of hf:{name}", resize=256, crop=(224, 224), interpolation="bicubic",
                            mean=IMAGENET_MEAN, std=IMAGENET_STD)
    elif family == "clip":
        chosen = Preprocess(f"config of hf:{name}", resize=size, crop=(size, size), interpolation="bicubic",
                            mean=CLIP_MEAN, std=CLIP_STD)
    else:  # transformers' ViTImageProcessor defaults
        chosen = Preprocess(f"config of hf:{name}", resize=(size, size), interpolation="bilinear", mean=HALF, std=HALF)
    warnings.warn(
        f"hf:{name} has no preprocessor_config.json; using {chosen.describe()}. Pass preprocess= to choose",
        stacklevel=4,
    )
    return chosen


def _walk(model: nn.Module, path: str) -> bool:
    module = model
    for part in path.split("."):
        if re.fullmatch(r"-?\d+", part) and isinstance(module, nn.ModuleList | nn.Sequential):
            if not module or not -len(module) <= int(part) < len(module):
                return False
            module = module[int(part)]
        elif part in module._modules and module._modules[part] is not None:
            module = module._modules[part]  # type: ignore[assignment]
        else:
            return False
    return True


def _layer(model: nn.Module) -> str | None:
    return next((path for path in _LAYER_CANDIDATES if _walk(model, path)), None)


def _class_names(config: object) -> tuple[str, ...] | None:
    labels = getattr(config, "id2label", None) or {}
    names = tuple(str(labels[i]) for i in sorted(labels, key=int)) if labels else ()
    if not names or all(re.fullmatch(r"LABEL_\d+", n) for n in names):
        return None
    return names


def load_classifier(
    name: str, weights: Path | None, num_classes: int | None, preprocess: Preprocess | None
) -> ClassifierParts:
    """A transformers image classifier."""
    tf = _transformers()
    source = resolve_source(name)
    config = load_config(tf, source, name)
    architectures = list(getattr(config, "architectures", None) or [])
    if architectures and not any(a.endswith("ForImageClassification") for a in architectures):
        raise InvalidArgumentError(
            f"hf:{name} is a {architectures[0]}, not an image classifier; add a linear head on its features with "
            "head=FILE (train one with 'finercam train-probe')"
        )
    model, info = _from_pretrained(tf.AutoModelForImageClassification, source, name, "an image classifier")
    _check_loading(info, name)
    if num_classes is not None and num_classes != model.config.num_labels:
        raise InvalidArgumentError(
            f"num_classes={num_classes} but hf:{name} has {model.config.num_labels} classes (config.num_labels)"
        )
    if weights is not None:
        load_into(model, read_state_dict(weights), f"weights file {str(weights)!r}")
    family = _FAMILIES.get(config.model_type, "")
    return ClassifierParts(
        model, config_preprocess(source, name, config, family, preprocess), _class_names(config), None
    )


def _from_pretrained(builder: Any, source: str, name: str, what: str, **kwargs: object) -> tuple[nn.Module, Any]:
    """``builder.from_pretrained`` from local files, its loading report muted; a folder transformers cannot read
    (weights missing, corrupt, or not of its ``config.json``) is one line.

    Raises:
        ModelNotFoundError: transformers has no such model class for the config.
        ModelLoadError: the weights are missing, unreadable, or do not fit the config.
    """
    with quiet_loading():
        try:
            return builder.from_pretrained(source, local_files_only=True, output_loading_info=True, **kwargs)
        except ValueError as error:
            raise ModelNotFoundError(f"hf:{name}: transformers cannot build {what}: {error}") from None
        except Exception as error:  # OSError (no weights file), SafetensorError (corrupt), RuntimeError (sizes)
            text = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
            if "ignore_mismatched_sizes" in str(error):
                text = ("its weights do not fit its config.json (a classifier of another number of classes than "
                        "num_labels / id2label says?)")
            raise ModelLoadError(f"hf:{name}: transformers cannot load {what} from it: {text}") from None


def load_backbone(name: str, weights: Path | None, preprocess: Preprocess | None) -> BackboneParts:
    """A transformers backbone: DINOv2, a CLIP image tower, or any ``AutoModel``."""
    tf = _transformers()
    source = resolve_source(name)
    config = load_config(tf, source, name)
    model_type = config.model_type
    family = _FAMILIES.get(model_type, "")
    architectures = list(getattr(config, "architectures", None) or [])
    kwargs: dict[str, object] = {}
    projected = False
    if model_type == "clip":
        vision = config.vision_config
        vision.projection_dim = config.projection_dim
        builder, kwargs, projected = tf.CLIPVisionModelWithProjection, {"config": vision}, True
    elif model_type == "clip_vision_model":
        projected = "CLIPVisionModelWithProjection" in architectures
        builder = tf.CLIPVisionModelWithProjection if projected else tf.CLIPVisionModel
    else:
        builder = tf.AutoModel
    model, info = _from_pretrained(builder, source, name, "a backbone", **kwargs)
    random_pooler = _check_loading(info, name, allowed_missing="pooler.")
    if weights is not None:
        load_into(model, read_state_dict(weights), f"weights file {str(weights)!r}")
    vision = getattr(config, "vision_config", None) if model_type == "clip" else config
    hidden_sizes = getattr(vision, "hidden_sizes", None)
    width = int(hidden_sizes[-1]) if hidden_sizes else int(vision.hidden_size)
    dims: dict[str, int] = {}
    if not random_pooler:
        dims["pooled"] = int(config.projection_dim) if projected else width
    prefix = None
    if model_type in _TOKEN_TYPES:
        prefix = 1 + int(getattr(config, "num_register_tokens", 0) or 0) + (1 if model_type == "deit" else 0)
        dims.update({"cls": width, "mean-patch": width})
    elif hidden_sizes:  # CNN feature maps
        dims["mean-patch"] = width
    if not dims:
        raise ModelNotFoundError(f"hf:{name}: its pooled output is not loaded and its token layout is unknown")
    auto = "mean-patch" if family == "dinov2" else ("pooled" if "pooled" in dims else next(iter(dims)))
    patch = getattr(vision, "patch_size", None)
    return BackboneParts(
        model, "hf", dims, auto, config_preprocess(source, name, config, family, preprocess), num_prefix_tokens=prefix,
        patch_size=int(patch) if isinstance(patch, int) else None, target_layer=_layer(model) if prefix else None,
        projected=projected, family=family,
    )
