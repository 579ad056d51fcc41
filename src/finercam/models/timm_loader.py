"""``timm:NAME`` models, never touching the network.

Weights, in order: ``weights=`` (or ``timm:NAME@FILE``); else the model's pretrained file when it is already in the
local Hugging Face cache (``try_to_load_from_cache``, no download) or in the torch hub cache (where
``torch.hub.load('facebookresearch/dinov2', ...)`` stores ``dinov2_vitb14_pretrain.pth``); else random weights with a
:class:`~finercam.errors.RandomWeightsWarning`. Checkpoints in another layout (e.g. the official DINOv2 ``.pth``) go
through timm's own ``checkpoint_filter_fn``. DINOv2 models, and any ViT given a variable-size or non-default input
size, are built with timm's ``dynamic_img_size=True`` (position embeddings are interpolated to each input); DINOv2
models without registers interpolate as the official DINOv2 code does (:mod:`finercam.models.dinov2`).
"""

from __future__ import annotations

import difflib
import importlib
import warnings
from pathlib import Path
from types import ModuleType
from urllib.parse import urlparse

import torch
from torch import nn

from finercam.errors import InvalidArgumentError, ModelNotFoundError, RandomWeightsWarning, WeightsError
from finercam.models._deps import require
from finercam.models.configs import from_timm_config
from finercam.models.dinov2 import use_official_interpolation
from finercam.models.parts import BackboneParts, ClassifierParts
from finercam.models.preprocess import Preprocess
from finercam.models.weights import StateDict, classifier_rows, load_into, read_state_dict

_HUB_FILENAMES = (
    "model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors", "open_clip_pytorch_model.bin"
)


def _timm() -> ModuleType:
    return require("timm", "timm: model specs")


def _check_name(timm: ModuleType, name: str) -> None:
    if timm.is_model(name):
        return
    arch = name.split(".")[0]
    names = timm.list_models()
    close = difflib.get_close_matches(arch, names, n=5, cutoff=0.6)
    close += [n for n in names if arch.lower() in n and n not in close][: 5 - len(close)] if len(arch) > 2 else []
    hint = f"; close names: {close}" if close else ""
    raise ModelNotFoundError(f"timm has no model {name!r}{hint}. All names: timm.list_models()")


def _cfg_value(cfg: object, key: str) -> object:
    return cfg.get(key) if isinstance(cfg, dict) else getattr(cfg, key, None)


def cached_weights(cfg: object) -> tuple[Path | None, list[str]]:
    """The pretrained weights file of a timm pretrained config if it is in a local cache, and where it looked."""
    looked: list[str] = []
    file = _cfg_value(cfg, "file")
    if isinstance(file, str) and file:
        if Path(file).is_file():
            return Path(file), looked
        looked.append(file)
    repo = _cfg_value(cfg, "hf_hub_id")
    if isinstance(repo, str) and repo:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            try_to_load_from_cache = None
        if try_to_load_from_cache is not None:
            preferred = _cfg_value(cfg, "hf_hub_filename")
            for filename in ([preferred] if isinstance(preferred, str) else []) + list(_HUB_FILENAMES):
                found = try_to_load_from_cache(repo, filename)
                if isinstance(found, str) and Path(found).is_file():
                    return Path(found), looked
            looked.append(f"Hugging Face cache ({repo})")
    url = _cfg_value(cfg, "url")
    if isinstance(url, str) and url:
        candidate = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
        if candidate.is_file():
            return candidate, looked
        looked.append(str(candidate))
    return None, looked


def _create(timm: ModuleType, name: str, preprocess: Preprocess | None, **kwargs: object) -> nn.Module:
    cfg = timm.models.get_pretrained_cfg(name)
    default = tuple(_cfg_value(cfg, "input_size") or (3, 224, 224))[1:] if cfg is not None else None
    variable = preprocess is not None and (preprocess.fixed_size is None or preprocess.fixed_size != default)
    if variable or "dinov2" in name:  # DINOv2 is meant for any input size; at the default size nothing changes
        try:
            return timm.create_model(name, pretrained=False, dynamic_img_size=True, **kwargs)
        except TypeError as error:  # the architecture has no dynamic_img_size option (CNNs do not need it)
            if "dynamic_img_size" not in str(error):
                raise
    return timm.create_model(name, pretrained=False, **kwargs)


def _weights(timm: ModuleType, name: str, weights: Path | None) -> tuple[StateDict | None, str]:
    """The state dict to load (``None``: random weights, with a warning) and its description."""
    if weights is not None:
        return read_state_dict(weights), f"weights file {str(weights)!r}"
    cached, looked = cached_weights(timm.models.get_pretrained_cfg(name) or {})
    if cached is not None:
        return read_state_dict(cached, "cached pretrained weights"), f"cached weights {str(cached)!r}"
    where = f" (looked in {', '.join(looked)})" if looked else ""
    warnings.warn(
        f"no pretrained weights for timm model {name!r} were found locally{where}; it is randomly initialised. "
        f"Pass weights=FILE (or timm:{name}@FILE), or put the weights in the Hugging Face cache",
        RandomWeightsWarning,
        stacklevel=4,
    )
    return None, ""


def _official_dinov2(model: nn.Module, name: str) -> nn.Module:
    if "dinov2" in name:
        use_official_interpolation(model)
    return model


def _filter_fn(model: nn.Module) -> object:
    return getattr(importlib.import_module(type(model).__module__), "checkpoint_filter_fn", None)


def _classifier_key(timm: ModuleType, name: str) -> str:
    cfg = timm.models.get_pretrained_cfg(name)
    classifier = _cfg_value(cfg, "classifier") if cfg is not None else None
    if isinstance(classifier, list | tuple):
        classifier = classifier[0] if classifier else None
    return f"{classifier or 'head'}.weight"


def _head_modules(timm: ModuleType, name: str) -> tuple[str, ...]:
    """The key prefixes of every classifier head a checkpoint of ``name`` holds and its backbone lacks: the modules
    around each of the pretrained config's classifiers (``head`` and ``head_dist`` of a distilled DeiT; ``head`` of
    LeViT, whose head is a batch norm and a linear layer)."""
    cfg = timm.models.get_pretrained_cfg(name)
    classifier = _cfg_value(cfg, "classifier") if cfg is not None else None
    names = [classifier] if isinstance(classifier, str) else list(classifier or ["head"])  # type: ignore[call-overload]
    return tuple(f"{entry.rsplit('.', 1)[0] if '.' in entry else entry}." for entry in names)


def load_classifier(
    name: str, weights: Path | None, num_classes: int | None, preprocess: Preprocess | None
) -> ClassifierParts:
    """A timm classifier (see the module docstring for where its weights come from)."""
    timm = _timm()
    _check_name(timm, name)
    state, source = _weights(timm, name, weights)
    kwargs: dict[str, object] = {}
    given = f"num_classes={num_classes} was given; leave it out to use the checkpoint's" if num_classes else ""
    if state is not None:
        key = _classifier_key(timm, name)
        rows = classifier_rows(state, key)
        if rows is None and num_classes is None:
            raise WeightsError(
                f"{source} has no classifier ({key!r}): it holds a feature backbone. Add a linear head with "
                "head=FILE (e.g. one trained with 'finercam train-probe'), or pass num_classes if the classifier "
                "is stored under another name"
            )
        num_classes = num_classes if num_classes is not None else rows
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    model = _official_dinov2(_create(timm, name, preprocess, **kwargs), name)
    if getattr(model, "num_classes", None) == 0:
        raise InvalidArgumentError(
            f"timm model {name!r} is a feature backbone without a classifier (num_classes=0); add a linear head with "
            "head=FILE, or pass num_classes for a randomly initialised classifier"
        )
    if state is not None:
        load_into(
            model, state, source, filter_fn=_filter_fn(model),  # type: ignore[arg-type]
            classifier=_classifier_key(timm, name)[: -len(".weight")], hint=given,
        )
    names = None
    if state is not None and getattr(model, "num_classes", 0) in (1000, 11821, 21841):  # ImageNet label sets
        subset = timm.data.infer_imagenet_subset(model)
        if subset:
            names = tuple(timm.data.ImageNetInfo(subset).label_descriptions())
            names = names if len(names) == model.num_classes else None
    data_config = timm.data.resolve_data_config({}, model=model)
    return ClassifierParts(model, from_timm_config(data_config, name), names, None)


def load_backbone(name: str, weights: Path | None, preprocess: Preprocess | None) -> BackboneParts:
    """A timm model without its classifier, for pooled features."""
    timm = _timm()
    _check_name(timm, name)
    state, source = _weights(timm, name, weights)
    model = _official_dinov2(_create(timm, name, preprocess, num_classes=0), name)
    if state is not None:
        heads = _head_modules(timm, name)
        load_into(
            model, state, source, filter_fn=_filter_fn(model),  # type: ignore[arg-type]
            ignore_unexpected=lambda key: key.startswith(heads),
        )
    width = int(getattr(model, "num_features", 0) or 0)
    pooled = int(getattr(model, "head_hidden_size", 0) or width)
    prefix = getattr(model, "num_prefix_tokens", None)
    dims = {"pooled": pooled, "mean-patch": width}
    if prefix:
        dims["cls"] = width
    family = "dinov2" if "dinov2" in name else ""
    blocks = getattr(model, "blocks", None)
    layer = None
    if isinstance(blocks, nn.Sequential | nn.ModuleList) and len(blocks) and hasattr(blocks[-1], "norm1"):
        layer = "blocks.-1.norm1"
    patch_embed = getattr(model, "patch_embed", None)
    patch = getattr(patch_embed, "patch_size", None)
    data_config = timm.data.resolve_data_config({}, model=model)
    return BackboneParts(
        model, "timm", dims, "mean-patch" if family == "dinov2" else "pooled", from_timm_config(data_config, name),
        num_prefix_tokens=int(prefix) if prefix is not None else None,
        patch_size=int(patch[0]) if isinstance(patch, tuple | list) else None,
        target_layer=layer, channels_last=getattr(model, "output_fmt", "NCHW") == "NHWC", family=family,
    )
