"""Shared fixtures: small random-init models, offline settings, and the torchvision repair for this machine."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
from torch import nn

from finercam.compat import import_torchvision

import_torchvision()  # before timm / pytorch_grad_cam / torchcam import it


class TinyNet(nn.Module):
    """A small CNN whose head varies spatially (1x1 conv + ReLU before pooling), so HiResCAM, Grad-CAM and
    Layer-CAM all differ. ``features`` is the natural target layer; ``head`` everything above it."""

    def __init__(self, num_classes: int = 6, channels: int = 8) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(8, channels, 3, stride=2, padding=1),
            nn.ReLU(inplace=True),
        )
        self.head = nn.Sequential(
            nn.Conv2d(channels, channels, 1),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(channels, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class LinearHeadNet(nn.Module):
    """Features, global average pooling and a linear classifier ``W``: Grad-CAM has a closed form here."""

    def __init__(self, num_classes: int = 5, channels: int = 6) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, channels, 3, stride=2, padding=1), nn.ReLU())
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


def _seeded(seed: int) -> None:
    torch.manual_seed(seed)


@pytest.fixture
def tiny_net() -> TinyNet:
    _seeded(0)
    return TinyNet().eval()


@pytest.fixture
def linear_head_net() -> LinearHeadNet:
    _seeded(1)
    return LinearHeadNet().eval()


@pytest.fixture
def images() -> torch.Tensor:
    _seeded(2)
    return torch.randn(4, 3, 16, 16)


@pytest.fixture
def resnet18() -> nn.Module:
    tv = import_torchvision()
    _seeded(3)
    return tv.models.resnet18(weights=None, num_classes=10).eval()


@pytest.fixture
def timm_vit() -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    _seeded(4)
    return VisionTransformer(
        img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=2, num_classes=10
    ).eval()


def _tiny_clip_tokenizer(folder: Path) -> Any:
    """A real ``CLIPTokenizer`` over single characters (BPE without merges), written offline."""
    import transformers as tf

    letters = list("abcdefghijklmnopqrstuvwxyz.")
    words = ["<|startoftext|>", "<|endoftext|>", *letters, *(f"{c}</w>" for c in letters)]
    vocab = {word: index for index, word in enumerate(words)}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return tf.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))


@pytest.fixture(scope="module")
def hf_clip(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Any]:
    tf = pytest.importorskip("transformers")
    tf.utils.logging.set_verbosity_error()
    tokenizer = _tiny_clip_tokenizer(tmp_path_factory.mktemp("tokenizer"))
    config = tf.CLIPConfig(
        text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "vocab_size": tokenizer.vocab_size, "max_position_embeddings": 32, "bos_token_id": 0,
                     "eos_token_id": 1, "pad_token_id": 1},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    torch.manual_seed(1)
    return tf.CLIPModel(config).eval(), tokenizer


OPEN_CLIP_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
}
"""A tiny open_clip CLIP with the real BPE vocabulary (it ships with open_clip), so the default tokenizer works."""


def tiny_open_clip(seed: int = 0, **text: object) -> nn.Module:
    """A random-init open_clip ``CLIP`` of :data:`OPEN_CLIP_CONFIG` (``text`` overrides its text tower's config)."""
    from open_clip.model import CLIP

    config = {**OPEN_CLIP_CONFIG, "text_cfg": {**OPEN_CLIP_CONFIG["text_cfg"], **text}}
    torch.manual_seed(seed)
    return CLIP(**config).eval()


@pytest.fixture(scope="module")
def open_clip_model() -> nn.Module:
    pytest.importorskip("open_clip")
    return tiny_open_clip()


@pytest.fixture(scope="module")
def make_open_clip() -> Any:
    """:func:`tiny_open_clip`, to build variants (another vocabulary, context length, seed)."""
    pytest.importorskip("open_clip")
    return tiny_open_clip
