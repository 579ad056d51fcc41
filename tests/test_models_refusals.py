"""Model files that load into something else than what was trained, or not at all: a checkpoint made for another
input or patch size is refused, not resampled; non-classifiers are named; a head's preset is kept; broken
transformers folders are one line; nested state dicts win over tensors beside them."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from finercam.errors import InvalidArgumentError, ModelLoadError, WeightsError
from finercam.models import load_model, save_head
from finercam.models.preprocess import get_preprocess

timm = pytest.importorskip("timm")


def test_a_vit_checkpoint_of_another_input_or_patch_size_is_refused(tmp_path: Path) -> None:
    """timm's checkpoint_filter_fn would resample the position embedding and patch projection to fit: another
    network than the one trained, loaded without a word."""
    torch.manual_seed(0)
    for name, options in (("size", {"img_size": 64}), ("patch", {"patch_size": 32}), ("same", {})):
        model = timm.create_model("vit_tiny_patch16_224", num_classes=3, **options)
        torch.save(model.state_dict(), tmp_path / f"{name}.pth")
    with pytest.raises(WeightsError, match=r"1 tensor\(s\) have other shapes, first: pos_embed: checkpoint "
                                           r"\(1, 17, 192\) vs model \(1, 197, 192\)"):
        load_model("timm:vit_tiny_patch16_224", weights=tmp_path / "size.pth")
    with pytest.raises(WeightsError, match=r"2 tensor\(s\) have other shapes, first: pos_embed: checkpoint "
                                           r"\(1, 50, 192\) vs model \(1, 197, 192\); patch_embed.proj.weight"):
        load_model("timm:vit_tiny_patch16_224", weights=tmp_path / "patch.pth")
    loaded = load_model("timm:vit_tiny_patch16_224", weights=tmp_path / "same.pth")  # the size it was made for
    x = torch.randn(1, 3, 224, 224)
    torch.testing.assert_close(loaded.model(x), model.eval()(x))


@pytest.mark.parametrize(("name", "kind"), [("fasterrcnn_resnet50_fpn", "an object-detection"),
                                            ("deeplabv3_resnet50", "a segmentation"), ("r3d_18", "a video"),
                                            ("raft_small", "an optical-flow")])
def test_torchvision_models_that_are_not_classifiers_are_named(name: str, kind: str) -> None:
    pytest.importorskip("torchvision")
    with pytest.raises(InvalidArgumentError, match=rf"torchvision's '{name}' is {kind} model, not an image "
                                                   "classifier"):
        load_model(f"torchvision:{name}")  # never built: building it would download its backbone's weights


@pytest.mark.parametrize("stored", ["imagenet@32", "IMAGENET", "clip@48x40"])
def test_a_heads_preset_with_a_size_or_in_capitals_is_kept(tmp_path: Path, stored: str) -> None:
    save_head(tmp_path / "h.safetensors", nn.Linear(512, 2), ["a", "b"],
              {"backbone": "timm:resnet18", "pooling": "pooled", "preprocess": stored})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random backbone weights
        loaded = load_model("timm:resnet18", head=tmp_path / "h.safetensors")
    assert loaded.preprocess == get_preprocess(stored), loaded.preprocess.describe()  # was the timm config's


def test_a_nested_state_dict_wins_over_tensors_beside_it(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=4).eval()
    state = {f"module.{key}": value for key, value in model.state_dict().items()}
    torch.save({"epoch": 90, "arch": "resnet18", "state_dict": state, "best_acc1": torch.tensor(71.3),
                "optimizer": {"state": {}}}, tmp_path / "imagenet_example.pth.tar")
    loaded = load_model("timm:resnet18", weights=tmp_path / "imagenet_example.pth.tar")
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(loaded.model(x), model(x))


@pytest.fixture(scope="module")
def hf_vit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tf: Any = pytest.importorskip("transformers")
    tf.utils.logging.set_verbosity_error()
    torch.manual_seed(8)
    config = tf.ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                          image_size=32, patch_size=8, num_labels=3)
    folder = tmp_path_factory.mktemp("hf") / "vit"
    tf.ViTForImageClassification(config).save_pretrained(folder)
    return folder


def test_broken_transformers_folders_are_one_line(hf_vit: Path, tmp_path: Path) -> None:
    cases = {}
    for name in ("no_weights", "corrupt", "other_labels"):
        shutil.copytree(hf_vit, tmp_path / name)
        cases[name] = tmp_path / name
    (cases["no_weights"] / "model.safetensors").unlink()
    (cases["corrupt"] / "model.safetensors").write_bytes(b"\xff" * 64)
    config = json.loads((cases["other_labels"] / "config.json").read_text())
    config["id2label"] = {str(i): f"c{i}" for i in range(6)}
    config["label2id"] = {f"c{i}": i for i in range(6)}
    (cases["other_labels"] / "config.json").write_text(json.dumps(config))
    reasons = {"no_weights": "no file named model.safetensors", "corrupt": "header",
               "other_labels": "its weights do not fit its config.json"}
    for name, folder in cases.items():
        with pytest.raises(ModelLoadError, match=rf"hf:.*{name}: transformers cannot load an image classifier from "
                                                 rf"it: .*{reasons[name]}"):
            load_model(f"hf:{folder}")


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_class_names_of_a_python_model_must_match_its_outputs(tmp_path: Path) -> None:
    (tmp_path / "net.py").write_text(
        "import torch\nfrom torch import nn\n\n"
        "class Net(nn.Module):\n"
        "    def __init__(self, names):\n"
        "        super().__init__()\n"
        "        self.conv, self.fc, self.class_names = nn.Conv2d(3, 4, 3), nn.Linear(4, 5), names\n\n"
        "    def forward(self, x):\n"
        "        return self.fc(self.conv(x).mean((2, 3)))\n\n"
        "def three():\n    return Net(['a', 'b', 'c'])\n\n"
        "def five():\n    return Net(list('abcde'))\n"
    )
    with pytest.raises(InvalidArgumentError, match=r"net.py:three: the model's class_names has 3 names but its "
                                                   r"classifier 'fc' has 5 outputs"):
        load_model(f"python:{tmp_path / 'net.py'}:three")
    assert load_model(f"python:{tmp_path / 'net.py'}:five").class_names == tuple("abcde")
    from finercam.models.file_loaders import _classifier_outputs

    scripted = torch.jit.script(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 7)))
    assert _classifier_outputs(scripted) == ("2", 7)  # read from a TorchScript module too
    assert _classifier_outputs(nn.Sequential(nn.Linear(4, 7), nn.Conv1d(1, 1, 1))) is None  # not a linear last


@pytest.mark.parametrize("name", ["deit_tiny_distilled_patch16_224", "levit_128s", "convnext_atto"])
def test_a_backbone_loads_from_its_classifiers_checkpoint(tmp_path: Path, name: str) -> None:
    """Every head of the checkpoint is left out (a distilled DeiT has two, LeViT's is a batch norm and a linear
    layer), and nothing else: ConvNeXt's head.norm belongs to the features and is loaded."""
    from finercam.models import load_backbone

    torch.manual_seed(0)
    classifier = timm.create_model(name, num_classes=5).eval()
    torch.save(classifier.state_dict(), tmp_path / "classifier.pth")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        backbone = load_backbone(f"timm:{name}", weights=tmp_path / "classifier.pth")
    expected = timm.create_model(name, num_classes=0)
    expected.load_state_dict({k: v for k, v in classifier.state_dict().items() if k in expected.state_dict()})
    loaded = backbone.features.backbone.state_dict()
    assert loaded.keys() == expected.state_dict().keys()
    for key, value in expected.state_dict().items():
        torch.testing.assert_close(loaded[key], value)


@pytest.mark.parametrize("name", ["googlenet", "inception_v3"])
def test_torchvision_checkpoints_without_auxiliary_classifiers_load(tmp_path: Path, name: str) -> None:
    """torchvision's own pretrained GoogLeNet and Inception-v3 weights are saved without their auxiliary heads."""
    tv = pytest.importorskip("torchvision")
    from finercam.models import load_backbone

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's note on init_weights
        model = tv.models.get_model(name, weights=None, aux_logits=False, init_weights=True, num_classes=4).eval()
    torch.save(model.state_dict(), tmp_path / "plain.pth")
    loaded = load_model(f"torchvision:{name}", weights=tmp_path / "plain.pth")
    x = torch.randn(1, 3, 299, 299)
    torch.testing.assert_close(loaded.model(x), model(x))
    features = load_backbone(f"torchvision:{name}", weights=tmp_path / "plain.pth")
    assert features.dim == model.fc.in_features


def test_a_torchvision_vit_gets_the_transform_of_its_own_input_size() -> None:
    """vit_h_14's DEFAULT weights (SWAG end-to-end) take 518 px; the model built without weights takes 224, which its
    SWAG linear-probe weights declare (building the 632M-parameter model is left out: only its size matters)."""
    tv = pytest.importorskip("torchvision")
    from types import SimpleNamespace

    from finercam.models.torchvision_loader import _preprocess

    built = _preprocess(tv, "vit_h_14", SimpleNamespace(image_size=224))  # type: ignore[arg-type]
    linear = tv.models.ViT_H_14_Weights.IMAGENET1K_SWAG_LINEAR_V1.transforms.keywords
    assert built.crop == (224, 224) and built.resize == linear["resize_size"] == 224
    assert _preprocess(tv, "vit_h_14", SimpleNamespace(image_size=518)).crop == (518, 518)  # type: ignore[arg-type]
    assert _preprocess(tv, "vit_b_16", tv.models.vit_b_16()).crop == (224, 224)


def test_a_head_knows_its_backbone_by_architecture_and_weights(tmp_path: Path) -> None:
    """The same backbone named two ways is no warning; other weights under the same name are (train-probe records
    their SHA-256 as backbone_weights_sha256)."""
    from finercam.fingerprint import file_fingerprint
    from finercam.models.heads import BACKBONE_WEIGHTS

    torch.manual_seed(0)
    for name in ("a", "b"):
        torch.save(timm.create_model("resnet18", num_classes=0).state_dict(), tmp_path / f"{name}.pth")
    digest = str(file_fingerprint(tmp_path / "a.pth")["sha256"])
    save_head(tmp_path / "h.safetensors", nn.Linear(512, 2), ["x", "y"],
              {"backbone": f"timm:resnet18@{tmp_path / 'a.pth'}", "pooling": "pooled", BACKBONE_WEIGHTS: digest})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same model named with weights=: was "trained on ..., not ..."
        load_model("timm:resnet18", weights=tmp_path / "a.pth", head=tmp_path / "h.safetensors")
        load_model(f"timm:resnet18@{tmp_path / 'a.pth'}", head=tmp_path / "h.safetensors")
    other = r"was trained on other backbone weights \(sha256 .{12}\.\.\.\) than '.*b\.pth'"
    with pytest.warns(UserWarning, match=other):
        load_model("timm:resnet18", weights=tmp_path / "b.pth", head=tmp_path / "h.safetensors")
    with pytest.warns(UserWarning, match="but no weights file is given"):
        load_model("timm:resnet18", head=tmp_path / "h.safetensors")
    with pytest.warns(UserWarning, match=r"was trained on 'timm:resnet18@.*', not 'timm:resnet34'"):
        load_model("timm:resnet34", head=tmp_path / "h.safetensors")
