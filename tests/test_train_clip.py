"""The embedded CLIP's contrastive losses (:mod:`finercam.embedded.train_clip`) against their formulas."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from finercam.embedded import train_clip
from finercam.errors import InvalidArgumentError


def test_clip_loss_is_the_symmetric_cross_entropy_of_the_pairs() -> None:
    logits = torch.tensor([[3.0, 1.0, -2.0], [0.5, 2.0, 0.0], [1.0, 1.5, -1.0]])
    by_hand = 0.0
    for i in range(3):  # rows: image i against every caption; columns: caption i against every image
        by_hand += -math.log(math.exp(logits[i, i]) / sum(math.exp(v) for v in logits[i].tolist())) / 6
        by_hand += -math.log(math.exp(logits[i, i]) / sum(math.exp(v) for v in logits[:, i].tolist())) / 6
    loss = train_clip.clip_info_nce(logits, torch.ones(3, 3, dtype=torch.bool))  # positives are ignored
    assert float(loss) == pytest.approx(by_hand, rel=1e-6)


def test_multi_positive_loss_reduces_to_clips_with_one_positive_per_row() -> None:
    logits = torch.randn(6, 6, generator=torch.Generator().manual_seed(0)) * 4
    one = torch.eye(6, dtype=torch.bool)
    assert torch.allclose(train_clip.multi_positive_info_nce(logits, one), train_clip.clip_info_nce(logits, one))


def test_multi_positive_loss_contrasts_each_positive_with_the_negatives_alone() -> None:
    logits = torch.tensor([[2.0, 1.0, -1.0], [0.0, 3.0, 0.5], [1.0, -0.5, 1.5]])
    positive = torch.eye(3, dtype=torch.bool)
    positive[0, 1] = True  # caption 1 is also true of image 0

    def term(own: float, negatives: list[float]) -> float:
        return -math.log(math.exp(own) / (math.exp(own) + sum(math.exp(v) for v in negatives)))

    rows = [(term(2.0, [-1.0]) + term(1.0, [-1.0])) / 2, term(3.0, [0.0, 0.5]), term(1.5, [1.0, -0.5])]
    columns = [term(2.0, [0.0, 1.0]), (term(1.0, [-0.5]) + term(3.0, [-0.5])) / 2, term(1.5, [-1.0, 0.5])]
    by_hand = 0.5 * (sum(rows) / 3 + sum(columns) / 3)
    assert float(train_clip.multi_positive_info_nce(logits, positive)) == pytest.approx(by_hand, rel=1e-6)
    # A true caption counted as a negative (CLIP's loss) costs more than when it is a positive.
    assert float(train_clip.clip_info_nce(logits, positive)) > by_hand


def test_an_unknown_loss_is_named_before_any_work(tmp_path: Path) -> None:
    message = r"unknown loss 'triplet'; choose one of \['clip', 'multi-positive'\]"
    with pytest.raises(InvalidArgumentError, match=message):
        train_clip.train(tmp_path, loss="triplet", log=lambda _: None)
    assert not any(tmp_path.iterdir())


def test_a_tiny_run_with_clips_loss_records_it_on_the_card(tmp_path: Path) -> None:
    card = train_clip.train(tmp_path, threads=1, log=lambda _: None, loss="clip", train_size=64, test_size=24,
                            epochs=1, batch_size=32)
    assert card["training"]["loss"] == train_clip.LOSS_CARDS["clip"]
    assert json.loads((tmp_path / "clip.json").read_text())["training"]["loss"] == train_clip.LOSS_CARDS["clip"]
    assert (tmp_path / "clip.safetensors").stat().st_size == card["weights_bytes"]


@pytest.mark.parametrize("name", ["cnn", "vit"])
def test_a_locked_image_tower_is_the_classifiers_frozen_backbone(tmp_path: Path, name: str) -> None:
    from safetensors.torch import load_file

    from finercam.embedded import load_embedded
    from finercam.embedded.clip_model import load_embedded_clip

    card = train_clip.train(tmp_path, threads=1, log=lambda _: None, locked_image=name, train_size=64, test_size=24,
                            epochs=1, batch_size=32)
    classifier = load_embedded(name)
    head = train_clip.LOCKED_HEADS[classifier.card["architecture"]["class"]]
    trained = load_file(tmp_path / "clip.safetensors")
    backbone = {k: v for k, v in classifier.model.state_dict().items() if not k.startswith(f"{head}.")}
    for key, value in backbone.items():  # weights and batch-norm statistics untouched by the training
        assert torch.equal(trained[f"visual.{key}"], value), key
    assert trained[f"visual.{head}.weight"].shape == (card["architecture"]["embed_dim"], backbone_width(classifier))
    assert card["target_layer"] == classifier.target_layer
    assert card["training"]["locked_image"]["model"] == f"embedded:{name}"
    clip = load_embedded_clip(tmp_path)  # loads like the shipped CLIP
    with torch.no_grad():
        assert clip.model.encode_image(torch.rand(1, 3, 64, 64)).shape == (1, card["architecture"]["embed_dim"])


def backbone_width(classifier: object) -> int:
    """The width of the pooled features the locked tower's projection reads."""
    config = classifier.card["architecture"]["config"]  # type: ignore[attr-defined]
    return int(config["widths"][-1] if "widths" in config else config["dim"])


def test_an_unknown_locked_tower_is_named(tmp_path: Path) -> None:
    message = r"unknown locked image tower 'resnet'; choose one of .*\['cnn', 'vit'\]"
    with pytest.raises(InvalidArgumentError, match=message):
        train_clip.train(tmp_path, locked_image="resnet", log=lambda _: None)
    with pytest.raises(InvalidArgumentError, match="--visual and --locked-image both choose the image tower"):
        train_clip.train(tmp_path, locked_image="cnn", visual="vit", log=lambda _: None)
