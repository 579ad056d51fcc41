"""Small random-init models of every loader kind, saved the way users keep real ones (weights files, HF
directories, an open_clip config with a checkpoint, a Python factory, a TorchScript archive). Each builder returns
the ``finercam`` model spec and the extra command-line arguments that load it."""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from finercam.compat import import_torchvision
from finercam.errors import RandomWeightsWarning
from finercam.models import save_head

FACTORY_SOURCE = """\
from torch import nn


def build(num_classes: int = 3) -> nn.Module:
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes),
    )
    net.class_names = [f"shape {i}" for i in range(num_classes)]
    return net
"""


def torchvision_resnet(folder: Path) -> tuple[str, list[str]]:
    tv = import_torchvision()
    torch.manual_seed(20)
    torch.save(tv.models.resnet18(weights=None, num_classes=10).state_dict(), folder / "resnet18.pth")
    return "torchvision:resnet18", ["--weights", str(folder / "resnet18.pth")]


def timm_vit(folder: Path) -> tuple[str, list[str]]:
    import timm

    torch.manual_seed(21)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=6)
    save_file(model.state_dict(), folder / "vit_tiny.safetensors")
    return "timm:vit_tiny_patch16_224", ["--weights", str(folder / "vit_tiny.safetensors")]


def hf_vit_classifier(folder: Path) -> tuple[str, list[str]]:
    import transformers as tf

    torch.manual_seed(22)
    labels = {0: "ant", 1: "bee", 2: "cat"}
    config = tf.ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                          image_size=64, patch_size=8, num_labels=3, id2label=labels,
                          label2id={v: k for k, v in labels.items()})
    tf.ViTForImageClassification(config).eval().save_pretrained(folder / "hf-vit")
    tf.ViTImageProcessor(size={"height": 64, "width": 64}).save_pretrained(folder / "hf-vit")
    return f"hf:{folder / 'hf-vit'}", []


def hf_dinov2_with_head(folder: Path) -> tuple[str, list[str]]:
    import transformers as tf

    torch.manual_seed(23)
    config = tf.Dinov2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                             image_size=56, patch_size=14)
    tf.Dinov2Model(config).eval().save_pretrained(folder / "hf-dinov2")
    save_head(folder / "dinov2-head.safetensors", nn.Linear(32, 4), ["w", "x", "y", "z"],
              {"pooling": "mean-patch", "preprocess": "dinov2"})
    return f"hf:{folder / 'hf-dinov2'}", ["--head", str(folder / "dinov2-head.safetensors")]


def open_clip_with_head(folder: Path) -> tuple[str, list[str]]:
    import open_clip

    config = {"embed_dim": 16,
              "vision_cfg": {"image_size": 64, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
              "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}}
    config_path = folder / "finercam-cli-clip.json"
    config_path.write_text(json.dumps(config))
    open_clip.add_model_config(config_path)
    torch.manual_seed(24)
    clip = open_clip.create_model("finercam-cli-clip", pretrained=None).eval()
    torch.save({"state_dict": clip.state_dict()}, folder / "clip.pt")
    save_head(folder / "clip-head.safetensors", nn.Linear(16, 3), ["red", "green", "blue"])
    return f"open_clip:{config_path}@{folder / 'clip.pt'}", ["--head", str(folder / "clip-head.safetensors")]


def python_factory(folder: Path) -> tuple[str, list[str]]:
    (folder / "factory.py").write_text(FACTORY_SOURCE)
    return f"python:{folder / 'factory.py'}:build", ["--preprocess", "imagenet"]


def torchscript_cnn(folder: Path) -> tuple[str, list[str]]:
    tv = import_torchvision()
    torch.manual_seed(25)
    torch.jit.script(tv.models.resnet18(weights=None, num_classes=5).eval()).save(str(folder / "resnet18.ts"))
    return f"torchscript:{folder / 'resnet18.ts'}", ["--preprocess", "imagenet"]


BUILDERS = {
    "torchvision": torchvision_resnet,
    "timm": timm_vit,
    "hf": hf_vit_classifier,
    "hf-backbone-head": hf_dinov2_with_head,
    "open_clip": open_clip_with_head,
    "python": python_factory,
    "torchscript": torchscript_cnn,
}


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A random RGB image."""
    generator = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(height, width, 3, generator=generator) * 255).to(torch.uint8).numpy())


def picture(path: Path, width: int = 96, height: int = 72, seed: int = 0) -> Path:
    """A random RGB picture saved to ``path`` (non-square on purpose)."""
    random_image(width, height, seed).save(path)
    return path


def shapes_dataset(root: Path, per_class: int = 12, size: int = 64) -> list[str]:
    """An ImageFolder tree with ``train/`` and ``val/``: a red disc, a green square or a blue bar on noise."""
    classes = ["disc", "square", "bar"]
    colours = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.8, 0.2], [0.1, 0.2, 0.9]])
    generator = torch.Generator().manual_seed(0)
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    for split, count in (("train", per_class), ("val", per_class // 2)):
        for label, name in enumerate(classes):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for index in range(count):
                cy, cx = (torch.randint(16, size - 16, (2,), generator=generator)).tolist()
                shape = [((ys - cy) ** 2 + (xs - cx) ** 2) < 100, ((ys - cy).abs() < 9) & ((xs - cx).abs() < 9),
                         ((ys - cy).abs() < 4) & ((xs - cx).abs() < 14)][label]
                image = 0.5 + 0.15 * torch.randn(size, size, 3, generator=generator)
                image[shape] = colours[label]
                pixels = (image.clamp(0, 1) * 255).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(root / split / name / f"{index}.png")
    return classes


def outputs_close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a loaded model's outputs match the original's (float32 tolerance)."""
    return torch.allclose(a, b, atol=1e-5, rtol=1e-4)


@contextmanager
def no_random_weights() -> Iterator[None]:
    """Fail if a model ends up with random weights (a :class:`RandomWeightsWarning` becomes an error)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RandomWeightsWarning)
        yield
