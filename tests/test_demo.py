"""The demo's metrics (RD@k, pointing game, energy) by hand, and ``finercam demo`` end to end on a tiny setting."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from finercam import synth
from finercam.cli import _parser
from finercam.demo import GAMMAS, check_outputs, fresh_seed, run_demo
from finercam.errors import InvalidArgumentError
from finercam.metrics import (
    METRICS,
    mask_energy,
    pointing_hits,
    rd_name,
    relative_confidence_drop,
    top_fraction_mask,
)
from metric_cases import pixel_case, softmax


def test_rd_by_hand_zero_fill() -> None:
    """Clean logits (2, 1, 0). k = 2/16 masks pixels 0 and 1 -> (0, 1, 0); k = 4/16 masks 0, 1, 5 and, among the
    tied zeros, pixel 2 (first in row-major order) -> (0, 0, 0)."""
    model, images, saliency = pixel_case()
    rd = relative_confidence_drop(model, images, saliency, torch.tensor([0]), torch.tensor([[1, 2]]),
                                  ks=(2 / 16, 4 / 16), fill="zero")
    clean = softmax([2, 1, 0])
    after_2 = softmax([0, 1, 0])
    after_4 = [1 / 3] * 3
    expected_2 = (clean[0] - after_2[0]) - (clean[1] - after_2[1])
    expected_4 = (clean[0] - after_4[0]) - (clean[1] - after_4[1])
    assert list(rd) == [2 / 16, 4 / 16]
    assert float(rd[2 / 16][0]) == pytest.approx(expected_2, abs=1e-6)
    assert float(rd[4 / 16][0]) == pytest.approx(expected_4, abs=1e-6)
    assert expected_2 > 0  # masking the target's own evidence hurts it more than its look-alike


def test_rd_by_hand_mean_fill_and_reference_row() -> None:
    """Filling with the mean 0.5 leaves half of each masked pixel's evidence; d is the first reference."""
    model, images, saliency = pixel_case()
    rd = relative_confidence_drop(model, images, saliency, torch.tensor([1]), torch.tensor([[0, 2]]),
                                  ks=(3 / 16,), fill="mean", mean=(0.5,))
    clean, after = softmax([2, 1, 0]), softmax([1, 0.5, 0])  # pixels 0, 1 and 5 -> 0.5
    expected = (clean[1] - after[1]) - (clean[0] - after[0])
    assert float(rd[3 / 16][0]) == pytest.approx(expected, abs=1e-6)


def test_rd_costs_one_forward_per_k() -> None:
    """A batch of 8 images: one clean pass plus one batched pass per k; none with the clean logits given."""
    model, _, _ = pixel_case()
    torch.manual_seed(0)
    images, saliency = torch.rand(8, 1, 4, 4), torch.rand(8, 4, 4)
    targets, references = torch.zeros(8, dtype=torch.long), torch.ones(8, 3, dtype=torch.long)
    rd = relative_confidence_drop(model, images, saliency, targets, references, mean=(0.5,))
    assert model.calls == [8, 8, 8]
    assert list(rd) == [0.05, 0.10] and rd[0.05].shape == (8,)
    model.calls.clear()
    again = relative_confidence_drop(model, images, saliency, targets, references, mean=(0.5,),
                                     clean_logits=model(images))
    assert model.calls == [8, 8, 8]  # the clean pass above, then one per k
    for k in rd:
        torch.testing.assert_close(again[k], rd[k])


def test_rd_rejects_bad_input() -> None:
    model, images, saliency = pixel_case()
    with pytest.raises(InvalidArgumentError, match="mean="):
        relative_confidence_drop(model, images, saliency, torch.tensor([0]), torch.tensor([[1]]))
    with pytest.raises(InvalidArgumentError, match="resolution"):
        relative_confidence_drop(model, images, saliency[:, :2], torch.tensor([0]), torch.tensor([[1]]), fill="zero")
    with pytest.raises(InvalidArgumentError, match="fraction"):
        relative_confidence_drop(model, images, saliency, torch.tensor([0]), torch.tensor([[1]]), ks=(0,), fill="zero")
    with pytest.raises(InvalidArgumentError, match="reference"):
        relative_confidence_drop(model, images, saliency, torch.tensor([0]), torch.tensor([[-1]]), fill="zero")


def test_top_fraction_ties_are_deterministic() -> None:
    flat = top_fraction_mask(torch.zeros(2, 4, 4), 0.25).flatten(1)
    assert flat[:, :4].all() and not flat[:, 4:].any()
    assert int(top_fraction_mask(torch.rand(1, 10, 10), 0.001).sum()) == 1  # at least one pixel


def test_metric_declarations() -> None:
    assert rd_name(0.05) == "rd@0.05" and rd_name(0.1) == "rd@0.10"
    for name in ("pointing", "energy", "rd@0.05", "rd@0.10"):
        assert METRICS[name].higher_is_better and METRICS[name].name == name


def test_pointing_and_energy_by_hand() -> None:
    saliency = torch.zeros(2, 5, 5)
    saliency[0, 1, 1] = 1.0  # peak one pixel diagonally off the mask
    saliency[0, 2, 2] = 0.5
    saliency[1, 2, 2] = 2.0  # inside the mask, but not the peak
    saliency[1, 0, 4] = 6.0  # the peak, far from the mask
    masks = torch.zeros(2, 5, 5, dtype=torch.bool)
    masks[:, 2, 2] = True
    assert pointing_hits(saliency, masks, 0).tolist() == [False, False]
    assert pointing_hits(saliency, masks, 1).tolist() == [True, False]
    torch.testing.assert_close(mask_energy(saliency, masks), torch.tensor([0.5 / 1.5, 2.0 / 8.0]))
    assert float(mask_energy(torch.zeros(1, 5, 5), masks[:1])) == 0.0


class TinyClassifier(nn.Module):
    """Takes images in [0, 1], normalises with mean 0.5 and std 0.25; 4 channels at 16 x 16, 12 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 5, stride=4, padding=2), nn.ReLU())
        self.fc = nn.Linear(4, 12)

    def forward(self, images: Tensor) -> Tensor:
        return self.fc(self.features((images - 0.5) / 0.25).mean(dim=(2, 3)))


@dataclass
class FakeEmbedded:
    name: str
    model: nn.Module
    class_names: tuple[str, ...]
    target_layer: str = "features"
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.25, 0.25, 0.25)
    image_size: int = 64
    card: dict[str, Any] = field(default_factory=dict)


def test_fresh_seed_avoids_the_cards_seeds() -> None:
    names = tuple(synth.generate(0).class_names)
    model = FakeEmbedded("m", TinyClassifier(), names, card={"data": {"seeds": {"train": 40, "test": 41}}})
    assert fresh_seed([model], 40) == 42
    assert fresh_seed([model], 7) == 7


def test_demo_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    names = tuple(synth.generate(0).class_names)
    models = [FakeEmbedded("tiny", TinyClassifier().eval(), names, card={"seeds": [5]})]
    args = _parser().parse_args(
        ["demo", "--out", str(tmp_path / "out"), "--size", "24", "--seed", "5", "--methods", "gradcam", "scorecam"]
    )
    assert run_demo(args, models) == 0

    records = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert isinstance(records, list) and len(records) == 2 * 2 * len(GAMMAS)  # methods x aggregations x gammas
    required = {"model", "method", "finer", "gamma", "pointing", "energy", "rd@0.05", "rd@0.10", "n_images"}
    for record in records:
        assert required <= set(record)
        assert record["finer"] == (record["gamma"] > 0)
        assert record["n_images"] == 24 and record["model"] == "tiny"
        assert 0 <= record["pointing"] <= 1 and 0 <= record["energy"] <= 1
        assert record["rd_fill"] == "mean" and record["rd_ks"] == [0.05, 0.1]
        assert record["test_seed"] == 6  # 5 is a seed of the model's card
    assert sorted({r["method"] for r in records}) == ["gradcam", "scorecam"]
    for aggregation in ("mean", "softmax"):
        chosen = [r for r in records if r["method"] == "gradcam" and r["aggregation"] == aggregation]
        assert sorted(r["gamma"] for r in chosen) == sorted(GAMMAS)
    base = {r["aggregation"]: r for r in records if r["method"] == "gradcam" and r["gamma"] == 0}
    assert base["mean"]["pointing"] == base["softmax"]["pointing"]  # gamma 0 is the base CAM either way

    page = (tmp_path / "out" / "report.html").read_text()
    assert "<table" in page and "rd@0.05" in page and "Score-CAM" in page
    assert page.count("data:image/png;base64,") >= 2  # the gamma plot and the samples
    assert not re.search(r"https?://", page)
    assert not re.search(r"""(?:src|href)=["'](?!data:)""", page)
    printed = capsys.readouterr().out
    assert "report.html" in printed and "Grad-CAM" in printed and "rd@0.10" in printed
    check_outputs(tmp_path / "out")  # its own outputs: a rerun replaces them
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "metrics.json").write_text('{"accuracy": 0.9}')
    with pytest.raises(InvalidArgumentError, match=r"holds a metrics\.json that finercam demo did not write"):
        run_demo(_parser().parse_args(["demo", "--out", str(tmp_path / "mine")]), models)  # before any work
    assert (tmp_path / "mine" / "metrics.json").read_text() == '{"accuracy": 0.9}'
    (tmp_path / "dir" / "report.html").mkdir(parents=True)
    with pytest.raises(InvalidArgumentError, match=r"holds report\.html, which is not a file"):
        check_outputs(tmp_path / "dir")
