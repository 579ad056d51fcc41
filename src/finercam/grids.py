"""Token grids inferred, never hard-coded: turning any layer's activations into maps ``(B, K, h, w)``.

:func:`grid_reshape` looks at a recorded activation, the input image size ``(H, W)`` and what the model says about
itself, and returns the reshape that :class:`finercam.FinerCAM` applies to the activations and their gradients:

* 4-D channels-first ``(B, C, h, w)`` (CNNs): ``None``, the activation already is a stack of maps.
* 3-D tokens ``(B, N, D)`` (ViT, DeiT, DINOv2 with registers, CLIP, HF Swin): the prefix tokens (CLS, distillation,
  registers) are dropped and the patch tokens laid out row by row as ``(h, w)``, a :class:`~finercam.TokenGrid`.
  With the model's patch size ``p`` (timm ``patch_embed.patch_size``, torchvision and open_clip ``patch_size``, HF
  ``config.patch_size``, else a patchify convolution whose kernel equals its stride), ``h`` is ``floor`` or
  ``ceil`` of ``H / p`` (models that pad round up) and the prefix count ``N - h w`` must be ``0..16`` and equal
  the model's own count where it has one (``num_prefix_tokens``, ``cls_token``, ``register_tokens``...).
  Hierarchical models that merge patches are matched at strides ``p * 2^k``. Without a patch size, the grid is
  searched among the factorisations of ``N - prefix`` consistent with the image's aspect ratio; it must be unique.
* 4-D channel-last ``(B, h, w, C)`` (timm and torchvision Swin): permuted to channels-first. The layout is read
  from the layer (a LayerNorm over the last dimension, a Linear: channel-last; a convolution, batch or group norm:
  channels-first) and checked against the input's aspect ratio; a channel-last output that no layer knowledge
  explains is recognised only when the channels-first reading does not fit the image. Ambiguous layouts raise
  :class:`~finercam.errors.AmbiguousLayoutError` asking for an explicit ``reshape``.
* Sequence-first tokens ``(N, B, D)`` (``nn.MultiheadAttention`` without ``batch_first``): transposed first. When
  ``N == B`` the shape cannot tell, and the ``batch_first`` flag of the attention beside the layer decides.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor, nn

from finercam.errors import AmbiguousLayoutError, GridInferenceError, ModelShapeError
from finercam.layers import ChannelsLast, Reshape, SequenceFirst, TokenGrid, int_pair

MAX_PREFIX_TOKENS = 16
MAX_MERGE_LEVELS = 5
ASPECT_TOLERANCE = 1.5
_PREFIX_ATTRIBUTES = {"cls_token": 1, "class_token": 1, "class_embedding": 1, "dist_token": 1, "distillation_token": 1}
_REGISTER_ATTRIBUTES = ("register_tokens", "reg_token", "reg_tokens")
_CHANNELS_FIRST_TYPES = (
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
)


@dataclass(frozen=True)
class Geometry:
    """What the model says about its tokens: patch size ``(ph, pw)`` and prefix token count (``None``: unknown)."""

    patch_size: tuple[int, int] | None
    prefix_tokens: int | None


def grid_reshape(
    model: nn.Module,
    layer_module: nn.Module,
    activation_shape: tuple[int, ...],
    image_size: tuple[int, int],
    *,
    batch_size: int | None = None,
) -> Reshape | None:
    """The reshape that turns ``layer_module``'s activations into maps ``(B, K, h, w)``.

    Args:
        model: the model that owns the layer (searched for patch size and prefix tokens).
        layer_module: the target layer.
        activation_shape: the shape of the layer's output, e.g. ``(B, N, D)``.
        image_size: the input's ``(H, W)`` in pixels.
        batch_size: the input's ``B``, to recognise sequence-first tokens ``(N, B, D)``.

    Returns:
        ``None`` when the activation already is channels-first maps, else a callable (a :class:`TokenGrid`,
        :class:`ChannelsLast` or :class:`SequenceFirst`) that works for any leading batch size.

    Raises:
        GridInferenceError: no token grid fits the number of tokens and the image size.
        AmbiguousLayoutError: several layouts fit equally well; pass ``reshape=`` explicitly.
    """
    shape = tuple(int(d) for d in activation_shape)
    height, width = image_size
    if len(shape) == 4:
        return _four_d_layout(model, layer_module, shape, (height, width))
    if len(shape) == 3:
        geometry = model_geometry(model, layer_module)
        if batch_size is not None and shape[1] == batch_size and (
            shape[0] != batch_size or declared_batch_first(model, layer_module) is False
        ):
            return SequenceFirst(infer_token_grid(shape[0], (height, width), geometry))
        return infer_token_grid(shape[1], (height, width), geometry)
    raise ModelShapeError(
        f"cannot make maps from a layer output of shape {shape}: expected channels-first maps (B, C, h, w), "
        "channel-last maps (B, h, w, C) or tokens (B, N, D). Pick a spatial layer (see finercam.autolayer."
        "candidate_layers) or pass reshape= a callable returning (B, K, h, w)."
    )


# --- model knowledge -------------------------------------------------------------------------------------------------


def _ancestors(model: nn.Module, module: nn.Module) -> list[nn.Module]:
    """``module`` and its ancestors in ``model``, innermost first, ``model`` last (``[model]`` if not found)."""
    for name, candidate in model.named_modules():
        if candidate is module:
            chain = [model]
            for part in name.split(".") if name else []:
                chain.append(dict(chain[-1].named_children())[part])
            return chain[::-1]
    return [model]


def declared_batch_first(model: nn.Module, layer_module: nn.Module) -> bool | None:
    """The ``batch_first`` flag of the attention next to ``layer_module`` (``nn.MultiheadAttention``,
    ``nn.Transformer*Layer``, open_clip's transformer): searched in the layer's innermost ancestor that has one;
    ``None`` when none declares it. It decides the layout of tokens ``(N, B, D)`` when ``N == B``."""
    for ancestor in _ancestors(model, layer_module):
        for module in ancestor.modules():
            flag = getattr(module, "batch_first", None)
            if isinstance(flag, bool):
                return flag
    return None


def _patch_size_of(module: nn.Module) -> tuple[int, int] | None:
    """Patch size declared by ``module`` (timm, torchvision, open_clip, HF), else ``None``."""
    sources = [
        getattr(getattr(module, "patch_embed", None), "patch_size", None),
        getattr(module, "patch_size", None),
        getattr(getattr(module, "config", None), "patch_size", None),
    ]
    embeddings = getattr(module, "embeddings", None)
    if isinstance(embeddings, nn.Module):
        sources.append(getattr(embeddings, "patch_size", None))
    for source in sources:
        pair = int_pair(source)
        if pair is not None:
            return pair
    return None


def _patchify_conv(module: nn.Module) -> tuple[int, int] | None:
    """The stride of the first convolution in ``module`` whose kernel equals its stride (> 1): a patch embedding."""
    for sub in module.modules():
        if isinstance(sub, nn.Conv2d) and sub.kernel_size == sub.stride and max(sub.stride) > 1:
            return int(sub.stride[0]), int(sub.stride[1])
    return None


def _prefix_tokens_of(module: nn.Module) -> int | None:
    """Prefix tokens declared by ``module`` or its ``embeddings`` child: ``num_prefix_tokens`` or CLS, distillation
    and register token parameters; ``None`` when it declares none."""
    count, found = 0, False
    for owner in (module, getattr(module, "embeddings", None)):
        if not isinstance(owner, nn.Module):
            continue
        declared = getattr(owner, "num_prefix_tokens", None)
        if isinstance(declared, int) and not isinstance(declared, bool):
            return declared
        for attribute, tokens in _PREFIX_ATTRIBUTES.items():
            if isinstance(getattr(owner, attribute, None), Tensor):
                count, found = count + tokens, True
        for attribute in _REGISTER_ATTRIBUTES:
            registers = getattr(owner, attribute, None)
            if isinstance(registers, Tensor) and registers.ndim >= 2:
                count, found = count + int(registers.shape[-2]), True
    return count if found else None


def model_geometry(model: nn.Module, layer_module: nn.Module) -> Geometry:
    """Patch size and prefix tokens of the (sub)model that owns ``layer_module``, innermost declaration first."""
    ancestors = _ancestors(model, layer_module)
    patch = next((p for p in map(_patch_size_of, ancestors) if p is not None), None)
    if patch is None:
        patch = next((p for p in map(_patchify_conv, ancestors) if p is not None), None)
    prefix = next((p for p in map(_prefix_tokens_of, ancestors) if p is not None), None)
    return Geometry(patch, prefix)


# --- token grids -----------------------------------------------------------------------------------------------------


def _sides(pixels: int, stride: int) -> set[int]:
    """Grid sides a stride gives: ``floor`` (no padding) or ``ceil`` (padded)."""
    return {pixels // stride, -(-pixels // stride)} - {0}


def _stride_consistent(h: int, w: int, image_size: tuple[int, int]) -> bool:
    """Whether one integer stride turns ``(H, W)`` into ``(h, w)`` (rounding down or up)."""
    height, width = image_size
    strides = {height // h, -(-height // h), width // w, -(-width // w)} - {0}
    return any(h in _sides(height, s) and w in _sides(width, s) for s in strides)


Grid = tuple[int, int, int]  # rows, columns, prefix tokens


def _grids_at_stride(
    num_tokens: int, image_size: tuple[int, int], stride: tuple[int, int], prefixes: range | set[int]
) -> set[Grid]:
    """The grids ``floor`` or ``ceil`` of ``(H, W) / stride`` whose prefix count ``N - h w`` is allowed."""
    return {
        (h, w, num_tokens - h * w)
        for h in _sides(image_size[0], stride[0])
        for w in _sides(image_size[1], stride[1])
        if num_tokens - h * w in prefixes
    }


def _factorisations(num_tokens: int, image_size: tuple[int, int], prefixes: range | set[int]) -> set[Grid]:
    """The factorisations ``h * w = N - prefix`` that one integer stride makes of ``(H, W)``."""
    found: set[Grid] = set()
    for prefix in prefixes:
        patches = num_tokens - prefix
        for h in range(1, math.isqrt(max(patches, 0)) + 1):
            if patches % h:
                continue
            for rows, cols in {(h, patches // h), (patches // h, h)}:
                if _stride_consistent(rows, cols, image_size):
                    found.add((rows, cols, prefix))
    return found


def _describe(grids: set[Grid]) -> str:
    return ", ".join(f"{h}x{w} + {p} prefix" for h, w, p in sorted(grids, key=lambda g: (g[2], g[0])))


def infer_token_grid(num_tokens: int, image_size: tuple[int, int], geometry: Geometry) -> TokenGrid:
    """The :class:`TokenGrid` of ``num_tokens`` tokens for an ``(H, W)`` input.

    Raises:
        GridInferenceError: no grid fits.
        AmbiguousLayoutError: several grids fit.
    """
    known = geometry.prefix_tokens
    any_prefix = range(MAX_PREFIX_TOKENS + 1)
    found: set[Grid] = set()
    # the model's prefix count first, then none: a layer before the prefix tokens are added (``patch_embed``)
    choices: list[set[int] | None] = [None] if known is None else [{known}, {0}] if known else [{0}]
    for prefix_choice in choices:
        if geometry.patch_size is not None:
            ph, pw = geometry.patch_size
            for level in range(MAX_MERGE_LEVELS + 1):
                prefixes = prefix_choice if prefix_choice is not None else (any_prefix if level == 0 else {0})
                found = _grids_at_stride(num_tokens, image_size, (ph << level, pw << level), prefixes)
                if found:
                    break
        if not found:
            found = _factorisations(num_tokens, image_size, prefix_choice if prefix_choice is not None else any_prefix)
        if found:
            break
    if len(found) == 1:
        h, w, prefix = found.pop()
        return TokenGrid(h, w, prefix_tokens=prefix)
    what = (
        f"{num_tokens} tokens for a {image_size[0]}x{image_size[1]} input (patch size "
        f"{geometry.patch_size or 'unknown'}, prefix tokens {'unknown' if known is None else f'{known} or 0'})"
    )
    if not found:
        raise GridInferenceError(
            f"no patch grid fits {what}: h*w + prefix must equal the token count with 0..{MAX_PREFIX_TOKENS} "
            "prefix tokens and h, w matching the image. Is the layer a token layer of this image's model? "
            "Pass reshape=TokenGrid(h, w, prefix_tokens) explicitly."
        )
    raise AmbiguousLayoutError(
        f"several patch grids fit {what}: {_describe(found)}. Pass reshape=TokenGrid(h, w, prefix_tokens) explicitly."
    )


# --- 4-D layouts -----------------------------------------------------------------------------------------------------


def plausible_grid(h: int, w: int, image_size: tuple[int, int]) -> bool:
    """Whether a spatial grid ``(h, w)`` can come from an ``(H, W)`` image: a common stride, or the same aspect."""
    height, width = image_size
    if not (1 <= h <= height and 1 <= w <= width):
        return False
    if _stride_consistent(h, w, image_size):
        return True
    ratio = (height / h) / (width / w)
    return 1 / ASPECT_TOLERANCE <= ratio <= ASPECT_TOLERANCE


def _layer_evidence(layer_module: nn.Module, shape: tuple[int, ...]) -> str | None:
    """``"first"`` or ``"last"`` when the layer's type tells where its channels are, else ``None``."""
    if isinstance(layer_module, _CHANNELS_FIRST_TYPES):
        return "first"
    if isinstance(layer_module, nn.Linear):
        return "last" if layer_module.out_features == shape[-1] else None
    normalized = getattr(layer_module, "normalized_shape", None)
    if isinstance(normalized, tuple | list) and len(normalized) == 1 and shape[1] != shape[-1]:
        if normalized[0] == shape[-1]:
            return "last"
        if normalized[0] == shape[1]:
            return "first"
    return None


def _mixes_layouts(model: nn.Module) -> bool:
    """Whether the model holds channel-last stages (Swin) or permutes between layouts."""
    return any("swin" in type(m).__name__.lower() or type(m).__name__ == "Permute" for m in model.modules())


def _four_d_layout(
    model: nn.Module, layer_module: nn.Module, shape: tuple[int, ...], image_size: tuple[int, int]
) -> Reshape | None:
    first_ok = plausible_grid(shape[2], shape[3], image_size)
    last_ok = plausible_grid(shape[1], shape[2], image_size)
    evidence = _layer_evidence(layer_module, shape)
    where = f"layer {type(layer_module).__name__} emits {shape} for a {image_size[0]}x{image_size[1]} input"
    if evidence == "last" and not first_ok and not last_ok:
        raise GridInferenceError(
            f"{where}: its type says channel-last, but neither channels-first (B, C, h, w) nor channel-last "
            "(B, h, w, C) is a map of the image (a layer of blocks of tokens, such as NesT's (B, blocks, tokens, C), "
            "is neither). Pick a layer that emits maps or tokens of the whole image, or pass reshape= a callable "
            "that returns (B, K, h, w) (reshape=None if it is channels-first after all)."
        )
    if evidence == "last" and not last_ok and first_ok:
        raise AmbiguousLayoutError(
            f"{where}: its type says channel-last (B, h, w, C) but only the channels-first reading (B, C, h, w) fits "
            "the image. Pass reshape=None (channels-first) or reshape=finercam.grids.ChannelsLast() explicitly if "
            "one of them is right, else pick another layer."
        )
    if evidence == "last" or (evidence is None and last_ok and not first_ok):
        return ChannelsLast()
    if evidence is None and first_ok and last_ok and _mixes_layouts(model):
        raise AmbiguousLayoutError(
            f"{where}: both channels-first (B, C, h, w) and channel-last (B, h, w, C) fit the image and the model "
            "mixes layouts. Pass reshape=None (channels-first) or reshape=finercam.grids.ChannelsLast() explicitly."
        )
    return None  # channels-first: PyTorch's convention, confirmed by the layer type or the image's geometry
