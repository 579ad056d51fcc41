"""DINOv2 in timm, made to resize its position embeddings exactly as the official DINOv2 code does.

At any input other than the native 518 x 518 (a 37 x 37 patch grid) a ViT interpolates its learned position
embeddings to the patch grid. The official ``facebookresearch/dinov2`` models without registers (those the Finer-CAM
code loads with ``torch.hub.load('facebookresearch/dinov2', 'dinov2_vitb14')``) interpolate bicubically with
``scale_factor = (grid + 0.1) / 37`` and no antialiasing (``interpolate_offset=0.1``, ``interpolate_antialias=False``
in ``dinov2/hub/backbones.py``); timm resizes to the grid size with antialiasing, which gives different features
at the sizes the official preprocessing produces. :func:`use_official_interpolation` swaps in the official rule.
(The register models ``*_reg4`` use ``offset=0`` and antialiasing upstream, which is what timm does already.)
"""

from __future__ import annotations

import math
import types

import torch
import torch.nn.functional as F
from torch import Tensor, nn

OFFSET = 0.1


def _official_pos_embed(self: nn.Module, x: Tensor) -> Tensor:
    """timm ``VisionTransformer._pos_embed`` for NHWC patch tokens, with the official DINOv2 interpolation."""
    batch, height, width, dim = x.shape
    pos_embed = self.pos_embed
    patches = pos_embed.shape[1] - 1
    grid = math.isqrt(patches)
    if height * width == patches and height == width:
        patch_pos = pos_embed[:, 1:]
    else:
        resized = F.interpolate(
            pos_embed[:, 1:].float().reshape(1, grid, grid, dim).permute(0, 3, 1, 2),
            scale_factor=((height + OFFSET) / grid, (width + OFFSET) / grid),
            mode="bicubic",
            antialias=False,
        )
        assert resized.shape[-2:] == (height, width)
        patch_pos = resized.permute(0, 2, 3, 1).reshape(1, height * width, dim).to(x.dtype)
    cls = self.cls_token.expand(batch, -1, -1) + pos_embed[:, :1]
    return self.pos_drop(torch.cat([cls, x.reshape(batch, height * width, dim) + patch_pos], dim=1))


def use_official_interpolation(model: nn.Module) -> bool:
    """Make a timm DINOv2 ViT (no registers, ``dynamic_img_size=True``) interpolate like the official code.

    Returns:
        Whether the model qualified and was changed.
    """
    qualifies = (
        getattr(model, "dynamic_img_size", False)
        and getattr(model, "cls_token", None) is not None
        and getattr(model, "reg_token", None) is None
        and not getattr(model, "no_embed_class", True)
        and getattr(model, "pos_embed", None) is not None
        and math.isqrt(model.pos_embed.shape[1] - 1) ** 2 == model.pos_embed.shape[1] - 1
    )
    if qualifies:
        model._pos_embed = types.MethodType(_official_pos_embed, model)  # type: ignore[method-assign]
    return bool(qualifies)
