"""Linear head files: finercam's safetensors heads with class names, and the official repo's plain state dicts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from finercam.errors import InvalidArgumentError, ModelFileNotFoundError, WeightsError
from finercam.models import load_head, save_head

# ----------------------------------------------------------------------------------------------------- heads


def test_save_and_load_head_roundtrip(tmp_path: Path) -> None:
    linear = nn.Linear(6, 3)
    save_head(tmp_path / "h.safetensors", linear, ["a", "b", "c"], {"backbone": "timm:x", "pooling": "cls"})
    loaded, names, metadata = load_head(tmp_path / "h.safetensors")
    assert names == ("a", "b", "c") and metadata["pooling"] == "cls" and metadata["backbone"] == "timm:x"
    assert torch.equal(loaded.weight, linear.weight) and torch.equal(loaded.bias, linear.bias)
    with pytest.raises(InvalidArgumentError, match="3 classes"):
        save_head(tmp_path / "x.safetensors", linear, ["a"])


def test_load_head_official_formats(tmp_path: Path) -> None:
    linear = nn.Linear(768, 525)
    torch.save(linear.state_dict(), tmp_path / "classifier_birds_DINO.pth")  # the official repository's format
    loaded, names, metadata = load_head(tmp_path / "classifier_birds_DINO.pth")
    assert (loaded.in_features, loaded.out_features) == (768, 525) and names is None
    assert metadata["format"] == "torch-state-dict"
    nested = {"state_dict": {f"module.classifier.{k}": v for k, v in nn.Linear(4, 2).state_dict().items()}}
    (tmp_path / "sub").mkdir()
    torch.save(nested, tmp_path / "sub" / "best.pth")
    (tmp_path / "sub" / "class_names.json").write_text(json.dumps(["x", "y"]))  # as tutorials/dino_train.py writes
    loaded, names, _ = load_head(tmp_path / "sub" / "best.pth")
    assert loaded.out_features == 2 and names == ("x", "y")


def test_load_head_rejects_non_linear_and_pickles(tmp_path: Path) -> None:
    mlp = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
    torch.save(mlp.state_dict(), tmp_path / "mlp.pth")
    with pytest.raises(WeightsError, match="not a single linear head"):
        load_head(tmp_path / "mlp.pth")
    torch.save(nn.Linear(3, 2), tmp_path / "module.pth")  # a pickled module, not a state dict
    with pytest.raises(WeightsError, match="weights_only"):
        load_head(tmp_path / "module.pth")
    with pytest.raises(ModelFileNotFoundError, match="does not exist"):
        load_head(tmp_path / "missing.pth")


@pytest.mark.parametrize(("content", "name"), [("this is text\n", "t.pth"), ("garbage\n", "g.safetensors")])
def test_a_text_file_is_not_a_head(content: str, name: str, tmp_path: Path) -> None:
    (tmp_path / name).write_text(content)
    with pytest.raises(WeightsError, match=r"head file .* is not a checkpoint \(neither safetensors nor a torch.save"):
        load_head(tmp_path / name)
