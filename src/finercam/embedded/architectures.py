"""The architectures of the embedded models, in plain torch (no timm, no torchvision).

Both take images ``(B, 3, H, W)`` in ``[0, 1]``, normalise them internally with their ``mean`` / ``std`` buffers and
return logits ``(B, num_classes)``.

* :class:`SmallCNN`: a ResNet-like CNN whose last spatial stage, ``stage3``, runs at 1/4 of the input resolution
  (16 x 16 maps for 64 x 64 images), then global average pooling and a linear head.
* :class:`SmallViT`: a ViT with a convolutional patch embedding of stride 8 (an 8 x 8 token grid for 64 x 64 images),
  one CLS token (``num_prefix_tokens = 1``), pre-norm blocks ``blocks[i]`` with ``norm1`` / ``attn`` / ``norm2`` /
  ``mlp`` like timm, and a linear head on the mean of the patch tokens after the final norm (the paper's setup for
  its DINOv2 / CLIP backbones). The shipped ViT is explained at that final ``norm``: for a linear head on the mean of
  the N tokens z_i, Grad-CAM there is the exact decomposition of the score, ``(w_c - gamma w_d) . z_i / N`` per token.
  (``FinerCAM(model)`` on its own picks the paper's ``blocks.<last>.norm1``, which feeds only the last attention.)

Both split their forward into ``encode`` (the last spatial maps, or the final-normed tokens) and ``logits_from``, so
training code can read the features the head sees.

The layout (``patch_embed.patch_size``, ``patch_embed.img_size``, ``num_prefix_tokens``, ``blocks[i].norm1`` next to
``blocks[i].attn``) is what :mod:`finercam.autolayer` and :mod:`finercam.grids` read, so ``FinerCAM(model)`` finds the
layer and the token grid on its own.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _Normalised(nn.Module):
    """Holds the ``mean`` / ``std`` buffers ``(1, 3, 1, 1)`` and applies them."""

    def _init_normalisation(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def normalise(self, images: Tensor) -> Tensor:
        return (images - self.mean) / self.std


def _conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class BasicBlock(nn.Module):
    """A ResNet basic block: two 3x3 convs with batch norm, a (1x1 projected when needed) shortcut, ReLU."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = (
            nn.Identity() if cin == cout else nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))
        )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class SmallCNN(_Normalised):
    """``stem`` (stride 2) -> ``stage1`` -> max pool -> ``stage2`` -> ``stage3`` (stride 4 overall) -> GAP -> ``fc``.

    Explain ``stage3``: 16 x 16 maps for 64 x 64 inputs.
    """

    def __init__(
        self,
        num_classes: int = 12,
        widths: tuple[int, int, int, int] = (32, 48, 64, 96),
        mean: tuple[float, ...] = (0.5, 0.5, 0.5),
        std: tuple[float, ...] = (0.25, 0.25, 0.25),
    ) -> None:
        super().__init__()
        self._init_normalisation(mean, std)
        w0, w1, w2, w3 = widths
        self.stem = _conv_bn(3, w0, stride=2)
        self.stage1 = _conv_bn(w0, w1)
        self.pool = nn.MaxPool2d(2)
        self.stage2 = BasicBlock(w1, w2)
        self.stage3 = BasicBlock(w2, w3)
        self.fc = nn.Linear(w3, num_classes)

    def encode(self, images: Tensor) -> Tensor:
        """The ``stage3`` maps ``(B, C, H/4, W/4)``."""
        x = self.pool(self.stage1(self.stem(self.normalise(images))))
        return self.stage3(self.stage2(x))

    def logits_from(self, maps: Tensor) -> Tensor:
        """The head on :meth:`encode`'s maps: global average pooling, then ``fc``."""
        return self.fc(maps.mean(dim=(2, 3)))

    def forward(self, images: Tensor) -> Tensor:
        return self.logits_from(self.encode(images))


class ConvPatchEmbed(nn.Module):
    """Images ``(B, 3, H, W)`` -> patch tokens ``(B, (H/p) * (W/p), dim)`` through a small conv stem of stride
    ``p = patch_size`` (8 or 4).

    Three 3x3 convolutions (batch norm, GELU; strides 2, 2, 2 for ``p = 8`` and 2, 2, 1 for ``p = 4``; padding
    ``padding_mode``, zeros by default, ``"reflect"`` gives border tokens no edge to detect) and a 1x1 projection:
    each token sees its own p x p patch and a margin around it. The token grid is ``(H / p, W / p)``.
    """

    def __init__(
        self, dim: int, stem_widths: tuple[int, int] = (32, 64), img_size: int = 64, patch_size: int = 8,
        padding_mode: str = "zeros",
    ) -> None:
        super().__init__()
        if patch_size not in (4, 8):
            raise ValueError(f"ConvPatchEmbed has a stride of 8 or 4; got patch_size={patch_size}")
        last_stride = patch_size // 4
        a, b = stem_widths
        self.patch_size = (patch_size, patch_size)
        self.img_size = (img_size, img_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.stem = nn.Sequential(
            nn.Conv2d(3, a, 3, 2, 1, bias=False, padding_mode=padding_mode), nn.BatchNorm2d(a), nn.GELU(),
            nn.Conv2d(a, b, 3, 2, 1, bias=False, padding_mode=padding_mode), nn.BatchNorm2d(b), nn.GELU(),
            nn.Conv2d(b, dim, 3, last_stride, 1, bias=False, padding_mode=padding_mode), nn.BatchNorm2d(dim),
            nn.GELU(),
        )
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, images: Tensor) -> Tensor:
        return self.proj(self.stem(images)).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention (timm layout: ``qkv`` and ``proj``)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """A pre-norm transformer block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class SmallViT(_Normalised):
    """A small ViT: conv patch embedding (stride 8), CLS token, learned position embeddings, ``depth`` blocks, final
    norm, linear head on the mean of the patch tokens (``pool="mean"``, as the paper's DINOv2 heads) or on the CLS
    token (``pool="cls"``, as DeiT and timm's ViTs).

    ``norm`` and every ``blocks.<i>.norm1`` hold ``1 + (H/8) * (W/8)`` tokens, the patch tokens an 8 x 8 grid at
    64 x 64; the shipped ViT is explained at ``norm``.
    """

    num_prefix_tokens = 1

    def __init__(
        self,
        num_classes: int = 12,
        img_size: int = 64,
        dim: int = 128,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: float = 2.0,
        stem_widths: tuple[int, int] = (32, 64),
        mean: tuple[float, ...] = (0.5, 0.5, 0.5),
        std: tuple[float, ...] = (0.25, 0.25, 0.25),
        patch_size: int = 8,
        stem_padding: str = "zeros",
        pool: str = "mean",
    ) -> None:
        super().__init__()
        if pool not in ("mean", "cls"):
            raise ValueError(f"SmallViT pools the patch tokens' mean or the CLS token; got pool={pool!r}")
        self.pool = pool
        self._init_normalisation(mean, std)
        self.patch_embed = ConvPatchEmbed(  # type: ignore[arg-type]
            dim, tuple(stem_widths), img_size, patch_size, stem_padding
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches, dim))
        self.blocks = nn.ModuleList([Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def _pos_embed(self, h: int, w: int) -> Tensor:
        gh, gw = self.patch_embed.grid_size
        if (h, w) == (gh, gw):
            return self.pos_embed
        grid = self.pos_embed.reshape(1, gh, gw, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
        return grid.permute(0, 2, 3, 1).reshape(1, h * w, -1)

    def encode(self, images: Tensor) -> Tensor:
        """The final-normed tokens ``(B, 1 + N, dim)``: CLS first, then the ``N`` patch tokens in row-major order."""
        b, _, height, width = images.shape
        p = self.patch_embed.patch_size[0]
        tokens = self.patch_embed(self.normalise(images))
        tokens = tokens + self._pos_embed(-(-height // p), -(-width // p))
        x = torch.cat([self.cls_token.expand(b, -1, -1), tokens], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def pooled(self, tokens: Tensor) -> Tensor:
        """The head's input ``(B, dim)`` from :meth:`encode`'s tokens: the CLS token or the mean of the patch tokens."""
        if self.pool == "cls":
            return tokens[:, 0]
        return tokens[:, self.num_prefix_tokens :].mean(dim=1)

    def logits_from(self, tokens: Tensor) -> Tensor:
        """The linear ``head`` on :meth:`pooled` tokens."""
        return self.head(self.pooled(tokens))

    def forward(self, images: Tensor) -> Tensor:
        return self.logits_from(self.encode(images))


ARCHITECTURES: dict[str, type[nn.Module]] = {"SmallCNN": SmallCNN, "SmallViT": SmallViT}


def build(architecture: str, config: dict[str, Any]) -> nn.Module:
    """An architecture of :data:`ARCHITECTURES` from its name and keyword config (lists become tuples)."""
    kwargs = {key: tuple(value) if isinstance(value, list) else value for key, value in config.items()}
    return ARCHITECTURES[architecture](**kwargs)
