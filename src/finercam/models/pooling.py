"""Pooled features of a backbone: images ``(B, 3, H, W)`` -> features ``(B, D)``.

Pooling modes:

* ``mean-patch``: the mean of the final, normalised patch tokens, prefix tokens (CLS, registers) excluded. This is
  how the official Finer-CAM code feeds its linear heads: ``forward_features(x)["x_norm_patchtokens"].mean(dim=1)``
  on DINOv2. For CNN feature maps it is the spatial mean.
* ``cls``: the final, normalised CLS token.
* ``pooled``: the model's own pooled output (timm's pre-logits features, a transformers model's ``pooler_output``
  or CLIP's projected ``image_embeds``, open_clip's image embedding).
* ``auto``: ``mean-patch`` for DINOv2, ``pooled`` otherwise; with a head whose input size does not match, the first
  mode that does.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from finercam.errors import InvalidArgumentError, ModelOutputError
from finercam.models.parts import BackboneParts

POOLING_MODES = ("auto", "mean-patch", "cls", "pooled")
_FALLBACK_ORDER = ("pooled", "cls", "mean-patch")


@dataclass(frozen=True)
class Pooling:
    """How to read pooled features from one library's backbone.

    Attributes:
        library: ``timm``, ``hf``, ``open_clip`` or ``call`` (the module itself returns ``(B, D)``).
        mode: ``mean-patch``, ``cls`` or ``pooled``.
        num_prefix_tokens: tokens before the patch tokens (CLS + registers).
        channels_last: timm feature maps are ``(B, H, W, C)`` (Swin and similar).
        family: ``clip`` for transformers CLIP towers (their tokens get the final ``post_layernorm``).
        projected: read CLIP's projected ``image_embeds`` for ``pooled``.
    """

    library: str
    mode: str
    num_prefix_tokens: int = 0
    channels_last: bool = False
    family: str = ""
    projected: bool = False

    def __call__(self, backbone: nn.Module, images: Tensor) -> Tensor:
        if self.library == "timm":
            return self._timm(backbone, images)
        if self.library == "hf":
            return self._hf(backbone, images)
        output = backbone(images)
        if isinstance(output, tuple | list):
            output = output[0]
        return _check_2d(output, self)

    def _tokens(self, tokens: Tensor) -> Tensor:
        if self.mode == "cls":
            return tokens[:, 0]
        patches = tokens[:, self.num_prefix_tokens:]
        if patches.shape[1] == 0:
            raise ModelOutputError(f"the backbone returned no patch tokens (shape {tuple(tokens.shape)})")
        return patches.mean(dim=1)

    def _maps(self, maps: Tensor) -> Tensor:
        if self.mode == "cls":
            raise ModelOutputError("pooling 'cls' needs a transformer; this backbone returns feature maps")
        return maps.mean(dim=(1, 2) if self.channels_last else (2, 3))

    def _timm(self, backbone: nn.Module, images: Tensor) -> Tensor:
        features = backbone.forward_features(images)  # type: ignore[operator]
        if self.mode == "pooled":
            return _check_2d(backbone.forward_head(features, pre_logits=True), self)  # type: ignore[operator]
        if features.ndim == 3:
            return self._tokens(features)
        return self._maps(features)

    def _hf(self, backbone: nn.Module, images: Tensor) -> Tensor:
        output = backbone(pixel_values=images)
        if self.mode == "pooled":
            pooled = output.image_embeds if self.projected else output.pooler_output
            if pooled is None:
                raise ModelOutputError(f"{type(backbone).__name__} has no pooled output; use pooling 'cls'")
            return _check_2d(pooled.flatten(1) if pooled.ndim == 4 else pooled, self)
        hidden = output.last_hidden_state
        if hidden.ndim == 4:
            return self._maps(hidden)
        if self.family == "clip":  # CLIP's final LayerNorm is applied outside the encoder
            if self.mode == "cls":
                return backbone.vision_model.post_layernorm(hidden[:, 0])  # type: ignore[union-attr]
            hidden = backbone.vision_model.post_layernorm(hidden)  # type: ignore[union-attr]
        return self._tokens(hidden)


def _check_2d(output: object, pooling: Pooling) -> Tensor:
    if not isinstance(output, Tensor) or output.ndim != 2:
        shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
        raise ModelOutputError(
            f"the backbone's {pooling.mode!r} features have shape {shape}; expected (B, D) pooled features"
        )
    return output


class PooledFeatures(nn.Module):
    """A frozen backbone returning pooled features ``(B, D)``.

    Attributes:
        backbone: the network itself; its layers keep their names (``backbone.blocks.-1.norm1``).
        pooling: how features are read (:class:`Pooling`).
        dim: ``D``.
        num_prefix_tokens: CLS + register tokens before the patch tokens, for token-grid reshapes; ``None`` for CNNs.
        patch_size: the ViT patch size, when known.
        target_layer: the recommended CAM layer inside ``backbone`` (e.g. ``blocks.-1.norm1``), when known.
    """

    def __init__(
        self,
        backbone: nn.Module,
        pooling: Pooling,
        dim: int,
        *,
        num_prefix_tokens: int | None = None,
        patch_size: int | None = None,
        target_layer: str | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.pooling = pooling
        self.dim = dim
        self.num_prefix_tokens = num_prefix_tokens
        self.patch_size = patch_size
        self.target_layer = target_layer

    def forward(self, images: Tensor) -> Tensor:
        return self.pooling(self.backbone, images)

    def extra_repr(self) -> str:
        return f"pooling={self.pooling.mode!r}, dim={self.dim}"


def resolve_pooling(parts: BackboneParts, requested: str, head_dim: int | None, source: str) -> str:
    """The concrete pooling mode for ``requested`` (``auto`` resolved), checked against a head's input size.

    Raises:
        InvalidArgumentError: unknown or unavailable mode, or no mode matching the head.
    """
    if requested not in POOLING_MODES:
        raise InvalidArgumentError(f"unknown pooling {requested!r}; use one of {list(POOLING_MODES)}")
    available = ", ".join(f"{mode} ({dim}-d)" for mode, dim in parts.dims.items())
    if requested == "auto":
        mode = parts.auto
        if head_dim is not None and parts.dims.get(mode) != head_dim:
            matching = [m for m in _FALLBACK_ORDER if parts.dims.get(m) == head_dim]
            if not matching:
                raise InvalidArgumentError(
                    f"the head expects {head_dim}-d features but {source} gives {available}: the head belongs to "
                    "another backbone"
                )
            mode = matching[0]
        return mode
    if requested not in parts.dims:
        raise InvalidArgumentError(f"pooling {requested!r} is not available for {source}; available: {available}")
    if head_dim is not None and parts.dims[requested] != head_dim:
        raise InvalidArgumentError(
            f"the head expects {head_dim}-d features but {source} with pooling {requested!r} gives "
            f"{parts.dims[requested]}-d; available: {available}"
        )
    return requested


def build_features(parts: BackboneParts, mode: str) -> PooledFeatures:
    """A frozen, eval-mode :class:`PooledFeatures` for a resolved pooling mode."""
    pooling = Pooling(
        parts.library, mode, num_prefix_tokens=parts.num_prefix_tokens or 0, channels_last=parts.channels_last,
        family=parts.family, projected=parts.projected,
    )
    features = PooledFeatures(
        parts.module, pooling, parts.dims[mode], num_prefix_tokens=parts.num_prefix_tokens,
        patch_size=parts.patch_size, target_layer=parts.target_layer,
    )
    return features.eval().requires_grad_(False)
