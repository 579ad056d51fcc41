"""finercam.models: every loader kind but transformers and open_clip (``test_models_hf.py``), offline, from
random-init models saved to temporary files and directories.

Each test compares the loaded model's outputs with the original model's on the same input. Nothing is downloaded:
the pretrained-weights paths are exercised with fake local caches.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from finercam.compat import import_torchvision
from finercam.errors import (
    FinerCAMError,
    InvalidArgumentError,
    ModelFileNotFoundError,
    ModelNotFoundError,
    RandomWeightsWarning,
    WeightsError,
)
from finercam.models import (
    BackboneWithHead,
    load_backbone,
    load_model,
    parse_spec,
)
from zoo import no_random_weights, outputs_close, random_image

timm = pytest.importorskip("timm")


# ---------------------------------------------------------------------------------------------------- specs


def test_parse_spec_forms() -> None:
    assert parse_spec("timm:resnet18").kind == "timm"
    assert parse_spec("timm:resnet18@/w.pt").weights == "/w.pt"
    spec = parse_spec("python:/a/b.py:build")
    assert (spec.kind, spec.name, spec.factory) == ("python", "/a/b.py", "build")
    assert parse_spec("tv:resnet18").kind == "torchvision"
    assert parse_spec("hf:facebook/dinov2-base").name == "facebook/dinov2-base"
    with pytest.raises(ModelNotFoundError, match="known kinds"):
        parse_spec("caffe:alexnet")
    with pytest.raises(InvalidArgumentError, match="timm:resnet18"):
        parse_spec("resnet18")
    with pytest.raises(InvalidArgumentError, match="FUNCTION"):
        parse_spec("python:model.py")


def test_missing_optional_dependency_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from finercam.errors import MissingDependencyError

    monkeypatch.setitem(sys.modules, "open_clip", None)  # as if open_clip_torch were not installed
    with pytest.raises(MissingDependencyError, match=r"pip install 'finercam\[clip\]'"):
        load_backbone("open_clip:ViT-B-16")


# ------------------------------------------------------------------------------------------------------ timm


def test_timm_weights_file_and_errors(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=7).eval()
    save_file(model.state_dict(), tmp_path / "r18.safetensors")
    loaded = load_model("timm:resnet18", weights=tmp_path / "r18.safetensors")  # 7 classes read from the file
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert outputs_close(loaded.model(x), model(x))
    assert loaded.preprocess.crop == (224, 224) and loaded.preprocess.interpolation == "bicubic"
    assert not any(p.requires_grad for p in loaded.model.parameters()) and not loaded.model.training

    with pytest.raises(WeightsError, match=r"fc.weight: checkpoint \(7, 512\) vs model \(5, 512\).* The checkpoint's "
                       r"classifier 'fc' has 7 classes and the architecture 5\. num_classes=5 was given"):
        load_model("timm:resnet18", weights=tmp_path / "r18.safetensors", num_classes=5)
    with pytest.raises(ModelNotFoundError, match="resnet18"):
        load_model("timm:resnet81")
    with pytest.raises(ModelFileNotFoundError, match=r"nope\.safetensors"):
        load_model("timm:resnet18", weights=tmp_path / "nope.safetensors")
    torch.save(nn.Linear(2, 2), tmp_path / "pickled.pth")
    with pytest.raises(WeightsError, match="pickled"):
        load_model("timm:resnet18", weights=tmp_path / "pickled.pth")


def test_timm_random_init_warns() -> None:
    with pytest.warns(RandomWeightsWarning, match="randomly initialised"):
        loaded = load_model("timm:resnet18", num_classes=4)
    assert loaded.model(torch.randn(1, 3, 32, 32)).shape == (1, 4)


def test_timm_weights_from_local_hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    torch.manual_seed(1)
    model = timm.create_model("resnet18", pretrained=False).eval()  # 1000 ImageNet classes
    snapshot = tmp_path / "models--timm--resnet18.a1_in1k" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    save_file(model.state_dict(), snapshot / "model.safetensors")
    (tmp_path / "models--timm--resnet18.a1_in1k" / "refs").mkdir()
    (tmp_path / "models--timm--resnet18.a1_in1k" / "refs" / "main").write_text("0123abc")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with no_random_weights():
        loaded = load_model("timm:resnet18.a1_in1k")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert outputs_close(loaded.model(x), model(x))
    assert loaded.class_names is not None and len(loaded.class_names) == 1000
    assert loaded.class_names[0].startswith("tench")


def _official_dinov2_tokens(vit: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Final-normed tokens of a timm DINOv2 computed like facebookresearch/dinov2's ``forward_features``:
    ``interpolate_pos_encoding`` with ``scale_factor=(grid + 0.1) / sqrt(N)``, bicubic, no antialiasing."""
    _, _, w, h = x.shape  # the official code's (swapped) names
    tokens = vit.patch_embed.proj(x).flatten(2).transpose(1, 2)
    tokens = torch.cat((vit.cls_token.expand(x.shape[0], -1, -1), tokens), dim=1)
    pos_embed = vit.pos_embed.float()
    n = pos_embed.shape[1] - 1
    if tokens.shape[1] - 1 == n and w == h:
        pos = pos_embed
    else:
        w0, h0 = w // 14 + 0.1, h // 14 + 0.1
        side = int(math.sqrt(n))
        patch_pos = torch.nn.functional.interpolate(
            pos_embed[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2),
            scale_factor=(w0 / side, h0 / side), mode="bicubic", antialias=False,
        ).permute(0, 2, 3, 1).reshape(1, -1, pos_embed.shape[-1])
        pos = torch.cat((pos_embed[:, :1], patch_pos), dim=1)
    tokens = tokens + pos
    for block in vit.blocks:
        tokens = block(tokens)
    return vit.norm(tokens)


def _official_dinov2_checkpoint(model: nn.Module) -> dict[str, torch.Tensor]:
    """A state dict laid out like the official dinov2_vit*14_pretrain.pth (timm names + ``mask_token``)."""
    state = dict(model.state_dict())
    state["mask_token"] = torch.zeros(1, model.embed_dim)
    return state


def test_timm_dinov2_official_checkpoint_and_head(tmp_path: Path) -> None:
    torch.manual_seed(2)
    dino = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, dynamic_img_size=True)
    dino.eval()
    torch.save(_official_dinov2_checkpoint(dino), tmp_path / "dinov2_vits14_pretrain.pth")
    head = nn.Linear(384, 5)
    torch.save(head.state_dict(), tmp_path / "classifier.pth")  # official plain state-dict head
    loaded = load_model(
        "timm:vit_small_patch14_dinov2",
        weights=tmp_path / "dinov2_vits14_pretrain.pth",
        head=tmp_path / "classifier.pth",
    )
    assert isinstance(loaded.model, BackboneWithHead)
    assert loaded.target_layer == "backbone.blocks.-1.norm1"
    assert loaded.preprocess.name == "dinov2-official"  # plain head on DINOv2: the official preprocessing
    assert loaded.model.num_prefix_tokens == 1 and loaded.model.patch_size == 14
    pixels = loaded.preprocess(random_image(45, 30))  # variable size: 56 x 42 after rounding up
    assert pixels.shape == (3, 42, 56)
    with torch.no_grad():
        expected = head(_official_dinov2_tokens(dino, pixels[None])[:, 1:].mean(dim=1))
        assert outputs_close(loaded.model(pixels[None]), expected)
        plain = dino.forward_features(pixels[None])[:, 1:].mean(dim=1) @ head.weight.T + head.bias
        assert not outputs_close(plain, expected)
    from finercam.layers import resolve_layer

    assert resolve_layer(loaded.model, loaded.target_layer).module is loaded.model.backbone.blocks[-1].norm1


def test_timm_dinov2_from_torch_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(3)
    dino = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, dynamic_img_size=True)
    dino.eval()
    (tmp_path / "checkpoints").mkdir()
    torch.save(_official_dinov2_checkpoint(dino), tmp_path / "checkpoints" / "dinov2_vits14_pretrain.pth")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # where torch.hub.load('facebookresearch/dinov2')
    with no_random_weights():
        backbone = load_backbone("timm:vit_small_patch14_dinov2", preprocess="dinov2")
    assert backbone.pooling == "mean-patch" and backbone.dim == 384
    x = torch.randn(2, 3, 28, 42)
    with torch.no_grad():
        assert outputs_close(backbone.features(x), _official_dinov2_tokens(dino, x)[:, 1:].mean(dim=1))


def test_official_interpolation_only_changes_resized_position_embeddings() -> None:
    from finercam.models.dinov2 import use_official_interpolation

    torch.manual_seed(12)
    vit = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, dynamic_img_size=True)
    native = torch.randn(1, 37, 37, 384)  # patch tokens (NHWC) at 518 x 518
    resized = torch.randn(1, 3, 5, 384)
    timm_native, timm_resized = vit._pos_embed(native), vit._pos_embed(resized)
    assert use_official_interpolation(vit)
    assert torch.equal(vit._pos_embed(native), timm_native)
    assert vit._pos_embed(resized).shape == timm_resized.shape
    assert not torch.allclose(vit._pos_embed(resized), timm_resized, atol=1e-4)
    registers = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, dynamic_img_size=True)
    assert not use_official_interpolation(registers)  # upstream's register models interpolate as timm does


def test_official_birds_head_on_vit_base_dinov2(tmp_path: Path) -> None:
    """A Linear(768, 525) file like classifier_birds_DINO.pth on the real ViT-B/14 DINOv2 architecture."""
    torch.manual_seed(4)
    head = nn.Linear(768, 525)
    torch.save(head.state_dict(), tmp_path / "classifier_birds_DINO.pth")
    with pytest.warns(RandomWeightsWarning):
        loaded = load_model("timm:vit_base_patch14_dinov2", head=tmp_path / "classifier_birds_DINO.pth")
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        logits = loaded.model(x)
        tokens = _official_dinov2_tokens(loaded.model.backbone, x)  # final-normed tokens: CLS + 8 x 8 patches
        assert tokens.shape == (2, 65, 768)
        expected = head(tokens[:, 1:].mean(dim=1))
    assert logits.shape == (2, 525) and outputs_close(logits, expected)


def test_backbone_pooling_modes_and_errors(tmp_path: Path) -> None:
    with pytest.warns(RandomWeightsWarning):
        backbone = load_backbone("timm:vit_small_patch14_dinov2", pooling="cls", preprocess="dinov2")
    x = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        assert outputs_close(backbone.features(x), backbone.features.backbone.forward_features(x)[:, 0])
    with pytest.raises(InvalidArgumentError, match="unknown pooling"):
        load_backbone("timm:resnet18", pooling="max")
    torch.save(nn.Linear(100, 3).state_dict(), tmp_path / "h.pth")
    with pytest.warns(RandomWeightsWarning), pytest.raises(InvalidArgumentError, match="100-d features"):
        load_model("timm:resnet18", head=tmp_path / "h.pth")


# --------------------------------------------------------------------------------------------- checkpoint files


@pytest.mark.parametrize(
    ("content", "name"),
    [("this is text\n", "t.pth"), ("hello world", "h.pth"), ("garbage\n", "g.safetensors"), ("x", "x.pth")],
)
def test_files_that_are_not_checkpoints_get_one_message(content: str, name: str, tmp_path: Path) -> None:
    """Text breaks the unpickler in ways that depend on its bytes (IndexError, KeyError ...), and torch.load passes
    a *.safetensors name to safetensors: every such file gets the same message."""
    from finercam.models.weights import read_checkpoint

    (tmp_path / name).write_text(content)
    with pytest.raises(WeightsError, match=r"is not a checkpoint \(neither safetensors nor a torch.save file\)$"):
        read_checkpoint(tmp_path / name)


def test_only_a_classifier_mismatch_hints_at_the_number_of_classes(tmp_path: Path) -> None:
    tv = import_torchvision()
    torch.save(tv.models.mobilenet_v3_small(weights=None, num_classes=7).state_dict(), tmp_path / "seven.pth")
    with pytest.raises(WeightsError, match=r"The checkpoint's classifier 'classifier.3' has 7 classes and the "
                                           r"architecture 5\. num_classes=5 was given; leave it out"):
        load_model("torchvision:mobilenet_v3_small", weights=tmp_path / "seven.pth", num_classes=5)
    loaded = load_model("torchvision:mobilenet_v3_small", weights=tmp_path / "seven.pth")  # read from the file
    assert loaded.model.classifier[3].out_features == 7
    state = tv.models.mobilenet_v3_small(weights=None).state_dict()
    state["features.0.0.weight"] = torch.zeros(16, 3, 1, 1)
    torch.save(state, tmp_path / "conv.pth")
    with pytest.raises(WeightsError, match=r"features\.0\.0\.weight: checkpoint \(16, 3, 1, 1\)") as raised:
        load_model("torchvision:mobilenet_v3_small", weights=tmp_path / "conv.pth")
    assert "classes" not in str(raised.value) and "num_classes" not in str(raised.value)
    state = timm.create_model("resnet10t", pretrained=False).state_dict()
    state["conv1.0.weight"] = torch.zeros(24, 3, 1, 1)
    save_file(state, tmp_path / "timm.safetensors")
    with pytest.raises(WeightsError, match=r"conv1\.0\.weight: checkpoint \(24, 3, 1, 1\)") as raised:
        load_model("timm:resnet10t", weights=tmp_path / "timm.safetensors")
    assert "classes" not in str(raised.value)


def test_embedded_models_refuse_weights_and_heads_with_the_true_reason(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from finercam.models import embedded_loader

    torch.save({"w": torch.zeros(1)}, tmp_path / "any.pth")
    with pytest.raises(InvalidArgumentError, match=r"'embedded:cnn' ships its own weights; leave out the weights file"):
        load_model("embedded:cnn", weights=tmp_path / "any.pth")
    with pytest.raises(InvalidArgumentError, match="is a finished classifier, not a feature backbone"):
        load_backbone("embedded:cnn")

    def not_installed(name: str) -> object:
        raise FileNotFoundError(f"the embedded model {name!r} is not installed")

    monkeypatch.setattr(embedded_loader, "load_embedded", not_installed)
    with pytest.raises(ModelFileNotFoundError, match="'cnn' is not installed"):
        load_model("embedded:cnn")


# ----------------------------------------------------------------------------------------------- torchvision


def test_torchvision_weights_file(tmp_path: Path) -> None:
    tv = import_torchvision()
    torch.manual_seed(5)
    model = tv.models.resnet18(weights=None, num_classes=10).eval()
    checkpoint = {  # as training scripts save: DataParallel names, argparse args, numpy metrics
        "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()},
        "args": argparse.Namespace(lr=0.1, model="resnet18"),
        "best_metric": np.float64(0.93),
    }
    torch.save(checkpoint, tmp_path / "r.pth")
    loaded = load_model("torchvision:resnet18", weights=tmp_path / "r.pth")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert outputs_close(loaded.model(x), model(x))
    assert loaded.preprocess.resize == 256 and loaded.preprocess.crop == (224, 224)
    backbone = load_backbone(f"torchvision:resnet18@{tmp_path / 'r.pth'}")
    model.fc = nn.Identity()
    with torch.no_grad():
        assert backbone.dim == 512 and outputs_close(backbone.features(x), model(x))
    with pytest.raises(ModelNotFoundError, match="resnet18"):
        load_model("torchvision:resnt18")


# ------------------------------------------------------------------------------------------ torchscript, python


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_torchscript(tmp_path: Path, tiny_net: nn.Module) -> None:
    torch.jit.script(tiny_net).save(str(tmp_path / "m.pt"))
    loaded = load_model(f"torchscript:{tmp_path / 'm.pt'}")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert outputs_close(loaded.model(x), tiny_net(x))
    torch.save(tiny_net.state_dict(), tmp_path / "state.pt")
    with pytest.raises(WeightsError, match="not a TorchScript archive"):
        load_model(f"torchscript:{tmp_path / 'state.pt'}")


def test_python_factory(tmp_path: Path) -> None:
    (tmp_path / "mine.py").write_text(
        "import torch\nfrom torch import nn\n\n"
        "def build(num_classes: int = 3) -> nn.Module:\n"
        "    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),\n"
        "                        nn.Linear(4, num_classes))\n"
        "    net.class_names = [f'c{i}' for i in range(num_classes)]\n"
        "    return net\n\n"
        "def broken():\n    raise ValueError('no GPU here')\n"
    )
    torch.manual_seed(6)
    reference = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))
    save_file(reference.state_dict(), tmp_path / "w.safetensors")
    loaded = load_model(f"python:{tmp_path / 'mine.py'}:build", weights=tmp_path / "w.safetensors", num_classes=5)
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        assert outputs_close(loaded.model(x), reference(x))
    assert loaded.class_names == ("c0", "c1", "c2", "c3", "c4")
    with pytest.raises(ModelNotFoundError, match="build"):
        load_model(f"python:{tmp_path / 'mine.py'}:make")
    with pytest.raises(FinerCAMError, match="no GPU here"):
        load_model(f"python:{tmp_path / 'mine.py'}:broken")
    with pytest.raises(WeightsError, match=r"other shapes.*\(5, 4\) vs model \(3, 4\)"):
        load_model(f"python:{tmp_path / 'mine.py'}:build", weights=tmp_path / "w.safetensors")
