"""Target layers: finding them in a model and turning their outputs into spatial grids.

A target layer is given as a module, a dotted name (``"layer4"``, ``"blocks.-1.norm1"``: integer parts index
``nn.Sequential`` / ``nn.ModuleList`` containers and may be negative), or a list of those. Transformer layers emit
token sequences ``(B, N, D)``; a :class:`TokenGrid` (or any callable) turns them into activation maps
``A`` of shape ``(B, K, h, w)`` as every base CAM expects; :class:`ChannelsLast` does so for Swin's ``(B, h, w, C)``.
:mod:`finercam.grids` picks the right one automatically. A layer may return a tensor, a tuple or list (HF layers
return ``(hidden_states, attentions)``), a dict or an HF ``ModelOutput``: its first tensor is its activation.
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from finercam.errors import InvalidArgumentError, InvalidTypeError, LayerNotFoundError, ModelShapeError

LayerSpec = nn.Module | str
Reshape = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class TargetLayer:
    """A resolved target layer: its dotted name in the model and the module itself."""

    name: str
    module: nn.Module


def check_model(model: object) -> nn.Module:
    """Return ``model`` if it is an ``nn.Module`` (TorchScript modules included)."""
    if not isinstance(model, nn.Module):
        raise InvalidTypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    return model


def _child(parent: nn.Module, part: str, path: str) -> nn.Module:
    """Return the child ``part`` of ``parent``; integer parts index containers and may be negative."""
    if part.lstrip("-").isdigit() and isinstance(parent, nn.Sequential | nn.ModuleList):
        index = int(part)
        if not -len(parent) <= index < len(parent):
            raise LayerNotFoundError(
                f"target layer {path!r}: index {index} is out of range for a container of {len(parent)} modules"
            )
        return parent[index]
    child = dict(parent.named_children()).get(part)
    if child is None:
        raise KeyError(part)
    return child


def _canonical_name(model: nn.Module, module: nn.Module) -> str:
    for name, candidate in model.named_modules():
        if candidate is module:
            return name or "<model>"
    raise LayerNotFoundError(
        f"target layer {type(module).__name__} is not a submodule of the model {type(model).__name__}; "
        "pass a module of this model or its dotted name"
    )


def resolve_layer(model: nn.Module, spec: LayerSpec) -> TargetLayer:
    """Resolve one layer specification to a :class:`TargetLayer`.

    Args:
        model: the model that owns the layer.
        spec: a submodule of ``model`` or its dotted name.

    Raises:
        LayerNotFoundError: the name does not exist; the message lists the closest names.
        InvalidTypeError: ``spec`` is neither a module nor a string.
    """
    if isinstance(spec, nn.Module):
        return TargetLayer(_canonical_name(model, spec), spec)
    if not isinstance(spec, str):
        raise InvalidTypeError(
            f"target_layer must be an nn.Module, a dotted name such as 'layer4', or a list of those; "
            f"got {type(spec).__name__}"
        )
    module: nn.Module = model
    for part in spec.split("."):
        try:
            module = _child(module, part, spec)
        except KeyError:
            names = [name for name, _ in model.named_modules() if name]
            ending = [name for name in names if name.endswith(f".{spec}")]  # "norm" -> "image_encoder.norm"
            close = list(dict.fromkeys([*ending, *difflib.get_close_matches(spec, names, n=5, cutoff=0.5)]))[:5]
            hint = f"; did you mean {', '.join(repr(n) for n in close)}?" if close else ""
            raise LayerNotFoundError(
                f"target layer {spec!r} does not exist in {type(model).__name__} "
                f"(no submodule {part!r}){hint or '.'} All layer names: model.named_modules()."
            ) from None
    return TargetLayer(_canonical_name(model, module), module)


def resolve_layers(model: nn.Module, spec: LayerSpec | Sequence[LayerSpec]) -> tuple[TargetLayer, ...]:
    """Resolve one or several layer specifications, rejecting an empty list and duplicates."""
    specs = list(spec) if isinstance(spec, list | tuple) else [spec]
    if not specs:
        raise InvalidArgumentError("target_layer is an empty list; give at least one layer")
    layers = tuple(resolve_layer(model, s) for s in specs)
    names = [layer.name for layer in layers]
    if len(set(names)) != len(names):
        raise InvalidArgumentError(f"target_layer lists the same layer twice: {names}")
    return layers


@dataclass(frozen=True)
class TokenGrid:
    """Reshape a token sequence ``(B, N, D)`` into activation maps ``(B, D, h, w)``.

    The first ``prefix_tokens`` tokens (CLS, distillation and register tokens) are dropped; the remaining
    ``h * w`` patch tokens are laid out row by row, as in ViT, DeiT and DINOv2.

    Args:
        height: rows ``h`` of the patch grid.
        width: columns ``w`` of the patch grid.
        prefix_tokens: tokens before the patch tokens (1 for a CLS token; 5 for CLS plus 4 registers).
    """

    height: int
    width: int
    prefix_tokens: int = 1

    def __post_init__(self) -> None:
        fields = (self.height, self.width, self.prefix_tokens)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in fields):
            raise InvalidTypeError(f"TokenGrid needs integer height, width and prefix_tokens; got {self}")
        if self.height < 1 or self.width < 1 or self.prefix_tokens < 0:
            raise InvalidArgumentError(
                f"TokenGrid needs height >= 1, width >= 1 and prefix_tokens >= 0; got {self}"
            )

    def __call__(self, tokens: Tensor) -> Tensor:
        if tokens.ndim != 3:
            raise ModelShapeError(
                f"TokenGrid expects tokens of shape (B, N, D), got {tuple(tokens.shape)}"
            )
        expected = self.prefix_tokens + self.height * self.width
        if tokens.shape[1] != expected:
            raise ModelShapeError(
                f"the layer emits {tokens.shape[1]} tokens but {self} expects "
                f"{self.prefix_tokens} prefix + {self.height}x{self.width} patch tokens = {expected}"
            )
        patches = tokens[:, self.prefix_tokens :, :]
        return patches.reshape(tokens.shape[0], self.height, self.width, tokens.shape[2]).permute(0, 3, 1, 2)


@dataclass(frozen=True)
class ChannelsLast:
    """Permute channel-last activations ``(B, h, w, C)`` (Swin) into maps ``(B, C, h, w)``."""

    def __call__(self, activation: Tensor) -> Tensor:
        if activation.ndim != 4:
            raise ModelShapeError(f"ChannelsLast expects (B, h, w, C); got {tuple(activation.shape)}")
        return activation.permute(0, 3, 1, 2)


@dataclass(frozen=True)
class SequenceFirst:
    """Transpose sequence-first tokens ``(N, B, D)`` to ``(B, N, D)``, then apply ``grid``."""

    grid: TokenGrid

    def __call__(self, tokens: Tensor) -> Tensor:
        if tokens.ndim != 3:
            raise ModelShapeError(f"SequenceFirst expects tokens (N, B, D); got {tuple(tokens.shape)}")
        return self.grid(tokens.transpose(0, 1))


def to_maps(activation: Tensor, reshape: Reshape | None) -> Tensor:
    """Apply ``reshape`` (if any) and check that the result is ``(B, K, h, w)``."""
    maps = reshape(activation) if reshape is not None else activation
    if not isinstance(maps, Tensor) or maps.ndim != 4:
        shape = tuple(maps.shape) if isinstance(maps, Tensor) else type(maps).__name__
        hint = (
            " A transformer layer emits tokens (B, N, D): use reshape='auto' (the default) or pass "
            "reshape=TokenGrid(h, w, prefix_tokens)."
            if isinstance(maps, Tensor) and maps.ndim == 3
            else ""
        )
        raise ModelShapeError(
            f"target layer activations must be maps of shape (B, K, h, w) after the reshape; got {shape}.{hint}"
        )
    return maps


def _first_tensor_key(output: object) -> int | str | None:
    """Where the primary tensor of a layer's output sits: an index of a tuple or list, a key of a mapping. It is the
    first floating-point tensor (activations; integer tensors beside them are indices or sizes)."""
    if isinstance(output, tuple | list):
        return next((i for i, item in enumerate(output) if _is_activation(item)), None)
    if isinstance(output, Mapping):  # dicts and HF ModelOutputs (their None fields are not keys)
        return next((key for key, item in output.items() if _is_activation(item)), None)
    return None


def _is_activation(item: object) -> bool:
    return isinstance(item, Tensor) and (item.is_floating_point() or item.is_complex())


def first_tensor(output: object) -> Tensor | None:
    """The tensor a layer emits: the output itself, the first floating-point tensor of a tuple or list (HF layers
    return ``(hidden_states, attention)``), or the first floating-point tensor value of a dict or HF ``ModelOutput``."""
    if isinstance(output, Tensor):
        return output
    key = _first_tensor_key(output)
    if key is None:
        return None
    return output[key]  # type: ignore[index]


def replace_first_tensor(output: object, tensor: Tensor) -> object:
    """Return a copy of ``output`` with its primary tensor (see :func:`first_tensor`) replaced by ``tensor``."""
    if isinstance(output, Tensor):
        return tensor
    key = _first_tensor_key(output)
    if key is None:
        raise InvalidTypeError(f"the layer output {type(output).__name__} holds no tensor to replace")
    if isinstance(output, tuple) and hasattr(output, "_fields"):  # a namedtuple
        return output._replace(**{output._fields[key]: tensor})  # type: ignore[index, attr-defined]
    if isinstance(output, tuple | list):
        items = list(output)
        items[key] = tensor  # type: ignore[index]
        return type(output)(items)
    if not isinstance(output, MutableMapping):
        raise InvalidTypeError(f"the layer output {type(output).__name__} is a read-only mapping; cannot replace it")
    copied = copy.copy(output)  # a ModelOutput copy keeps its type, its fields and their attributes in sync
    copied[key] = tensor
    return copied


def int_pair(value: object) -> tuple[int, int] | None:
    """``(a, b)`` from a positive int ``a`` (``(a, a)``) or a pair of positive ints; ``None`` for anything else."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value, value
    if (
        isinstance(value, tuple | list)
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        return int(value[0]), int(value[1])
    return None


def infer_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype | None]:
    """The device and floating dtype of the model's first parameter or buffer (CPU, None for a bare model)."""
    for tensor in [*model.parameters(), *model.buffers()]:
        dtype = tensor.dtype if tensor.is_floating_point() else None
        return tensor.device, dtype
    return torch.device("cpu"), None
