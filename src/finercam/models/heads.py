"""Linear heads on pooled backbone features: the model ``BackboneWithHead`` and the head files.

A head file written by :func:`save_head` is a safetensors file with tensors ``weight`` ``(C, D)`` and ``bias``
``(C,)`` and string metadata: ``format`` (``finercam-linear-head``), ``class_names`` (a JSON list) and whatever the
caller adds (``backbone``, ``pooling``, ``preprocess`` ...). :func:`load_head` also reads the official Finer-CAM
repository's heads (``classifier_weight/*.pth``): plain ``torch.save(nn.Linear(768, C).state_dict())`` files with
keys ``weight`` and ``bias``, possibly prefixed or nested; class names then come from a ``class_names.json`` beside the
file (as the official ``tutorials/dino_train.py`` writes) when present.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from finercam.errors import InvalidArgumentError, InvalidTypeError, WeightsError
from finercam.models.pooling import PooledFeatures
from finercam.models.weights import existing_file, is_safetensors, read_checkpoint, unwrap_state_dict

HEAD_FORMAT = "finercam-linear-head"
PLAIN_FORMAT = "torch-state-dict"
BACKBONE_WEIGHTS = "backbone_weights_sha256"
"""The head metadata key of the SHA-256 of the backbone weights file it was trained on (train-probe writes it)."""
_NAME_KEYS = ("class_names", "classes", "labels")


class BackboneWithHead(nn.Module):
    """A frozen feature backbone with a linear classifier: ``logits = head(pool(backbone(images)))``.

    The backbone keeps its module tree under ``backbone``, so target layers resolve inside it, e.g.
    ``backbone.blocks.-1.norm1`` for a timm DINOv2.

    Args:
        features: a :class:`PooledFeatures` (its backbone and pooling are adopted), or any module mapping images to
            ``(B, D)`` features.
        head: ``nn.Linear(D, C)``.

    Attributes:
        num_prefix_tokens: CLS + register tokens of a ViT backbone, else ``None``.
        patch_size: the ViT patch size when known.
        target_layer: the recommended CAM layer (e.g. ``backbone.blocks.-1.norm1``), else ``None``.
    """

    def __init__(self, features: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        if not isinstance(head, nn.Linear):
            raise InvalidTypeError(f"head must be an nn.Linear; got {type(head).__name__}")
        if isinstance(features, PooledFeatures):
            if head.in_features != features.dim:
                raise InvalidArgumentError(
                    f"the head expects {head.in_features}-d features but the backbone gives {features.dim}-d "
                    f"({features.pooling.mode!r} pooling)"
                )
            self.backbone = features.backbone
            self.pooling = features.pooling
            self.num_prefix_tokens = features.num_prefix_tokens
            self.patch_size = features.patch_size
            self.target_layer = f"backbone.{features.target_layer}" if features.target_layer else None
        elif isinstance(features, nn.Module):
            self.backbone = features
            self.pooling = None
            self.num_prefix_tokens = None
            self.patch_size = None
            self.target_layer = None
        else:
            raise InvalidTypeError(f"features must be an nn.Module; got {type(features).__name__}")
        self.head = head  # registered last: the last nn.Linear of the model is the classifier

    def forward(self, images: Tensor) -> Tensor:
        features = self.pooling(self.backbone, images) if self.pooling is not None else self.backbone(images)
        return self.head(features)

    def extra_repr(self) -> str:
        mode = self.pooling.mode if self.pooling is not None else "module"
        return f"pooling={mode!r}, classes={self.head.out_features}"


def save_head(
    path: str | Path, linear: nn.Linear, class_names: Sequence[str], metadata: Mapping[str, str] | None = None
) -> None:
    """Write a linear head and its class names to a safetensors file.

    Args:
        path: the file to write (conventionally ``*.safetensors``).
        linear: ``nn.Linear(D, C)``.
        class_names: ``C`` names, in class-index order.
        metadata: more string fields, e.g. ``{"backbone": "timm:vit_base_patch14_dinov2", "pooling": "mean-patch"}``.

    Raises:
        InvalidArgumentError: the names do not match ``C`` or the metadata is not strings.
    """
    from finercam.models._deps import require

    safetensors_torch = require("safetensors.torch", "saving a head")
    if not isinstance(linear, nn.Linear):
        raise InvalidTypeError(f"save_head needs an nn.Linear; got {type(linear).__name__}")
    names = [str(n) for n in class_names]
    if len(names) != linear.out_features:
        raise InvalidArgumentError(
            f"save_head: {len(names)} class names for a head with {linear.out_features} classes; give one per class"
        )
    extra = dict(metadata or {})
    bad = {k: type(v).__name__ for k, v in extra.items() if not isinstance(k, str) or not isinstance(v, str)}
    if bad:
        raise InvalidArgumentError(f"save_head: metadata keys and values must be strings; got {bad}")
    extra.update(
        format=HEAD_FORMAT, class_names=json.dumps(names), num_classes=str(linear.out_features),
        in_features=str(linear.in_features),
    )
    tensors = {"weight": linear.weight.detach().cpu().contiguous()}
    if linear.bias is not None:
        tensors["bias"] = linear.bias.detach().cpu().contiguous()
    Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
    safetensors_torch.save_file(tensors, str(Path(path).expanduser()), metadata=extra)


def _read_head_file(file: Path) -> tuple[dict[str, Tensor], dict[str, str], tuple[str, ...] | None]:
    if is_safetensors(file):
        from finercam.models._deps import require

        safetensors = require("safetensors", "reading a safetensors head")
        try:
            with safetensors.safe_open(str(file), framework="pt") as handle:
                metadata = dict(handle.metadata() or {})
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        except Exception as error:  # SafetensorError
            raise WeightsError(f"head file {str(file)!r} is not a readable safetensors file: {error}") from None
        names = None
        if "class_names" in metadata:
            try:
                names = tuple(str(n) for n in json.loads(metadata["class_names"]))
            except (json.JSONDecodeError, TypeError):
                raise WeightsError(f"head file {str(file)!r}: its class_names metadata is not a JSON list") from None
        return unwrap_state_dict(tensors, f"head file {str(file)!r}"), metadata, names
    checkpoint = read_checkpoint(file, "head file")
    names = None
    if isinstance(checkpoint, Mapping):
        for key in _NAME_KEYS:
            value = checkpoint.get(key)
            if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
                names = tuple(value)
                break
    return unwrap_state_dict(checkpoint, f"head file {str(file)!r}"), {"format": PLAIN_FORMAT}, names


def _linear_from_state(state: dict[str, Tensor], source: str) -> nn.Linear:
    matrices = [key for key, value in state.items() if value.ndim == 2]
    if len(matrices) != 1 or not matrices[0].endswith("weight"):
        shapes = {key: tuple(value.shape) for key, value in list(state.items())[:8]}
        raise WeightsError(
            f"{source} is not a single linear head: expected one weight matrix (C, D) and an optional bias (C,), "
            f"found {len(state)} tensors {shapes}. A head is nn.Linear(D, C); for a whole model use weights= instead"
        )
    weight_key = matrices[0]
    prefix = weight_key[: -len("weight")]
    bias = state.get(prefix + "bias")
    others = [key for key in state if key not in (weight_key, prefix + "bias")]
    if others:
        raise WeightsError(
            f"{source} is not a single linear head: besides {weight_key!r} it holds {others[:5]}; a head is "
            "nn.Linear(D, C)"
        )
    weight = state[weight_key]
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise WeightsError(
            f"{source}: bias {prefix + 'bias'!r} has shape {tuple(bias.shape)}; expected ({weight.shape[0]},)"
        )
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        linear.weight.copy_(weight.float())
        if bias is not None:
            linear.bias.copy_(bias.float())
    return linear.eval().requires_grad_(False)


def _sidecar_names(file: Path, count: int) -> tuple[str, ...] | None:
    sidecar = file.parent / "class_names.json"
    if not sidecar.is_file():
        return None
    try:
        names = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        warnings.warn(f"ignoring {sidecar}: not a JSON list of class names", stacklevel=3)
        return None
    if not isinstance(names, list) or len(names) != count:
        warnings.warn(
            f"ignoring {sidecar}: it lists {len(names) if isinstance(names, list) else '?'} names but the head has "
            f"{count} classes",
            stacklevel=3,
        )
        return None
    return tuple(str(n) for n in names)


def load_head(path: str | Path) -> tuple[nn.Linear, tuple[str, ...] | None, dict[str, str]]:
    """Read a linear head: a file from :func:`save_head` or a plain ``nn.Linear`` state dict.

    Returns:
        The frozen ``nn.Linear(D, C)``, the class names (or ``None``), and the metadata (``format`` is
        ``finercam-linear-head`` or ``torch-state-dict``).

    Raises:
        ModelFileNotFoundError: the file does not exist.
        WeightsError: it is not a single linear layer, or holds pickled Python objects.
    """
    file = existing_file(path, "head file")
    state, metadata, names = _read_head_file(file)
    linear = _linear_from_state(state, f"head file {str(path)!r}")
    if names is None:
        names = _sidecar_names(file, linear.out_features)
    if names is not None and len(names) != linear.out_features:
        raise WeightsError(
            f"head file {str(path)!r} has {len(names)} class names for {linear.out_features} classes"
        )
    return linear, names, metadata
