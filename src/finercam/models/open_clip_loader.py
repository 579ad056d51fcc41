"""``open_clip:ARCH`` image towers, with a local checkpoint (``ARCH@FILE`` or ``weights=``).

``ARCH`` is a built-in open_clip architecture (``ViT-B-16``), a model config JSON file (registered with
``open_clip.add_model_config``; the architecture is its file name without ``.json``), or ``local-dir:DIR`` (a folder
with ``open_clip_config.json`` and weights, loaded by open_clip itself). Checkpoints are read with
``weights_only=True`` and converted with open_clip's own helpers (old text-tower layouts, position-embedding resize).
The backbone is ``model.visual`` and its pooled output is CLIP's image embedding.
"""

from __future__ import annotations

import difflib
import warnings
from pathlib import Path
from types import ModuleType

from torch import nn

from finercam.errors import ModelLoadError, ModelNotFoundError, RandomWeightsWarning
from finercam.models._deps import quiet_loading, require
from finercam.models.configs import from_open_clip_config
from finercam.models.parts import BackboneParts
from finercam.models.preprocess import Preprocess
from finercam.models.weights import StateDict, existing_file, load_into, read_state_dict


def _open_clip() -> ModuleType:
    return require("open_clip", "open_clip: model specs")


def resolve_architecture(oc: ModuleType, arch: str) -> str:
    """The registered architecture name for ``arch``, registering a JSON config file first."""
    if arch.startswith("hf-hub:"):
        raise ModelNotFoundError(
            f"open_clip:{arch} would download from the Hugging Face hub; finercam loads local files only. Use "
            "open_clip:ARCH@/path/to/checkpoint or open_clip:local-dir:/path/to/folder"
        )
    if arch.startswith("local-dir:"):
        return arch
    if arch.endswith(".json"):
        file = existing_file(arch, "open_clip model config")
        oc.add_model_config(file)
        return file.stem
    names = oc.list_models()
    if arch in names:
        return arch
    lowered = {n.lower(): n for n in names}
    if arch.lower() in lowered:
        return lowered[arch.lower()]
    close = difflib.get_close_matches(arch, names, n=5, cutoff=0.6)
    hint = f"; close names: {close}" if close else ""
    raise ModelNotFoundError(
        f"open_clip has no architecture {arch!r}{hint}. All names: open_clip.list_models(); a custom config can be "
        "given as open_clip:/path/to/config.json"
    )


def convert_state_dict(oc: ModuleType, model: nn.Module, state: StateDict) -> StateDict:
    """open_clip's own fixes for older or foreign checkpoint layouts."""
    from open_clip import factory

    state = dict(state)
    if hasattr(factory, "convert_state_dict"):
        state = factory.convert_state_dict(model, state)
    if "positional_embedding" in state and not hasattr(model, "positional_embedding"):
        state = factory.convert_to_custom_text_state_dict(state)
    for key in ("text.transformer.embeddings.position_ids",):
        state.pop(key, None)
    scale = getattr(model, "logit_scale", None)
    if "logit_scale" in state and scale is not None and state["logit_scale"].ndim != scale.ndim:
        state["logit_scale"] = state["logit_scale"].reshape(scale.shape)
    factory.resize_pos_embed(state, model)
    if hasattr(factory, "resize_text_pos_embed"):
        factory.resize_text_pos_embed(state, model)
    return state


def create_model(oc: ModuleType, arch: str) -> tuple[str, nn.Module]:
    """The resolved architecture name and an open_clip model built from it with random weights, on the CPU."""
    name = resolve_architecture(oc, arch)
    with quiet_loading():
        try:
            return name, oc.create_model(name, pretrained=None, device="cpu")
        except Exception as error:  # open_clip raises RuntimeError, OSError, JSON and key errors for bad configs
            raise ModelLoadError(f"open_clip cannot build {arch!r}: {type(error).__name__}: {error}") from None


_PRETRAINED_KEYS = ("mean", "std", "interpolation", "resize_mode")
_LOCAL_WEIGHTS = ("*.safetensors", "*.bin", "*.pt", "*.pth")


def preprocess_of(oc: ModuleType, name: str, model: nn.Module, label: str) -> Preprocess:
    """The preprocessing of an open_clip model: the architecture's ``preprocess_cfg``, with the mean, std,
    interpolation and resize mode of its pretrained checkpoints when they all agree (a model built without a
    pretrained tag gets CLIP's defaults, which SigLIP's checkpoints do not use: mean and std 0.5, squashed); when
    they differ, the defaults, with a warning naming the tags."""
    config = dict(oc.get_model_preprocess_cfg(model))
    tags = [] if name.startswith("local-dir:") else list(oc.list_pretrained_tags_by_model(name))
    variants: dict[tuple[tuple[str, str], ...], list[str]] = {}
    settings: dict[tuple[tuple[str, str], ...], dict[str, object]] = {}
    for tag in tags:
        pretrained = oc.get_pretrained_cfg(name, tag) or {}
        chosen = {key: pretrained[key] for key in _PRETRAINED_KEYS if key in pretrained}
        key = tuple(sorted((k, repr(v)) for k, v in chosen.items()))
        variants.setdefault(key, []).append(tag)
        settings[key] = chosen
    if len(variants) == 1:
        config.update(next(iter(settings.values())))
    elif len(variants) > 1:
        described = "; ".join(
            f"{', '.join(tags[:3])}{f' and {len(tags) - 3} more' if len(tags) > 3 else ''}: {settings[key]}"
            for key, tags in variants.items()
        )
        warnings.warn(
            f"{label}: open_clip's pretrained checkpoints of {name} preprocess differently ({described}); finercam "
            f"uses the architecture's defaults (mean {config.get('mean')}, std {config.get('std')}): pass "
            "--preprocess (or preprocess=) if your checkpoint was trained otherwise",
            stacklevel=3,
        )
    return from_open_clip_config(config, label)


def warn_random_weights(architecture: str, arch: str, weights: object, stacklevel: int) -> None:
    """Warn that an open_clip model has random weights: no checkpoint given, and none in a ``local-dir:`` folder."""
    if weights is not None:
        return
    if architecture.startswith("local-dir:"):
        folder = Path(architecture[len("local-dir:"):])
        if any(next(folder.glob(pattern), None) for pattern in _LOCAL_WEIGHTS):
            return
        detail = f"the folder {str(folder)!r} holds no weights file ({', '.join(_LOCAL_WEIGHTS)})"
    else:
        detail = "no checkpoint given"
    warnings.warn(
        f"open_clip model {arch!r} has random weights ({detail}); pass open_clip:{arch}@FILE or --weights FILE",
        RandomWeightsWarning,
        stacklevel=stacklevel + 1,
    )


def load_backbone(arch: str, weights: Path | None) -> BackboneParts:
    """The image tower of an open_clip model."""
    oc = _open_clip()
    name, model = create_model(oc, arch)
    if weights is not None:
        state = read_state_dict(weights)
        if not any(key.startswith("visual.") for key in state) and any(k in model.visual.state_dict() for k in state):
            load_into(model.visual, state, f"weights file {str(weights)!r}")  # an image tower saved alone
        else:
            load_into(
                model, state, f"weights file {str(weights)!r}",
                filter_fn=lambda s, m: convert_state_dict(oc, m, s),
            )
    warn_random_weights(name, arch, weights, stacklevel=4)
    visual = model.visual
    transformer = getattr(visual, "transformer", None)
    blocks = getattr(transformer, "resblocks", None)
    is_vit = isinstance(blocks, nn.ModuleList) and len(blocks) > 0 and hasattr(blocks[-1], "ln_1")
    patch = getattr(visual, "patch_size", None)
    dim = getattr(visual, "output_dim", None)
    if not isinstance(dim, int):
        raise ModelLoadError(f"open_clip:{arch}: the image tower {type(visual).__name__} has no output_dim")
    return BackboneParts(
        visual, "open_clip", {"pooled": dim},
        "pooled", preprocess_of(oc, name, model, f"open_clip:{arch}"),
        num_prefix_tokens=1 if is_vit else None,
        patch_size=int(patch[0]) if isinstance(patch, tuple | list) else None,
        target_layer="transformer.resblocks.-1.ln_1" if is_vit else ("layer4" if hasattr(visual, "layer4") else None),
        family="clip",
    )
