"""The toy fine-grained dataset, its model, the figure and the ``finercam example`` command."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from finercam import toy
from finercam.cli import main
from finercam.metrics import mask_energy, pointing_hits


@pytest.fixture(scope="module")
def dataset() -> toy.ToyDataset:
    return toy.make_toy_dataset(96, seed=3)


def test_dataset_shapes_and_balance(dataset: toy.ToyDataset) -> None:
    assert dataset.images.shape == (96, 3, 64, 64)
    assert dataset.images.dtype == torch.float32
    assert float(dataset.images.min()) >= 0 and float(dataset.images.max()) <= 1
    assert dataset.labels.shape == (96,)
    assert set(dataset.labels.tolist()) == set(range(len(toy.CLASS_NAMES)))
    assert set(dataset.part_masks) == set(toy.PARTS)
    for mask in dataset.part_masks.values():
        assert mask.shape == (96, 64, 64) and mask.dtype == torch.bool
        assert bool(mask.flatten(1).any(1).all()), "every image has every part"


def test_parts_are_small(dataset: toy.ToyDataset) -> None:
    """Classes differ in a few percent of the image at most: this is a fine-grained task."""
    for part, mask in dataset.part_masks.items():
        fraction = mask.float().mean(dim=(1, 2))
        assert float(fraction.min()) > 0.003 and float(fraction.max()) < 0.03, part
    everything = toy.difference_mask(dataset.part_masks, torch.zeros(96, dtype=torch.long), 3)
    assert float(everything.float().mean(dim=(1, 2)).max()) < 0.05


@pytest.mark.parametrize("sibling", range(4))
def test_siblings_differ_exactly_in_the_difference_mask(dataset: toy.ToyDataset, sibling: int) -> None:
    """Rendering the same individuals as another class changes exactly the pixels of their difference mask."""
    images, masks = toy.render(dataset.individuals, sibling)
    changed = (images != dataset.images).any(dim=1)
    expected = toy.difference_mask(dataset.part_masks, dataset.labels, sibling)
    assert torch.equal(changed, expected)
    for part in toy.PARTS:  # a part's mask does not depend on the class
        assert torch.equal(masks[part], dataset.part_masks[part])


def test_difference_mask_is_the_union_of_differing_parts(dataset: toy.ToyDataset) -> None:
    beak, bar = dataset.part_masks["beak"], dataset.part_masks["wingbar"]
    assert not toy.difference_mask(dataset.part_masks, 2, 2).any()
    assert torch.equal(toy.difference_mask(dataset.part_masks, 0, 1), bar)  # red plain vs red barred
    assert torch.equal(toy.difference_mask(dataset.part_masks, 1, 3), beak)  # red barred vs blue barred
    assert torch.equal(toy.difference_mask(dataset.part_masks, 0, 3), beak | bar)
    assert toy.class_attributes(3) == {"beak": torch.tensor(1), "wingbar": torch.tensor(1)}


def test_dataset_is_deterministic_from_seed() -> None:
    first, second = toy.make_toy_dataset(16, seed=7), toy.make_toy_dataset(16, seed=7)
    assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)
    for part in toy.PARTS:
        assert torch.equal(first.part_masks[part], second.part_masks[part])
    assert not torch.equal(first.images, toy.make_toy_dataset(16, seed=8).images)


def test_training_is_deterministic_from_seed() -> None:
    test = toy.make_toy_dataset(64, seed=11)
    runs = [toy.train_toy_model(5, train_size=128, epochs=1, test=test) for _ in range(2)]
    (model_a, accuracy_a), (model_b, accuracy_b) = runs
    assert accuracy_a == accuracy_b and 0 <= accuracy_a <= 1
    for (name, a), (_, b) in zip(model_a.state_dict().items(), model_b.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert not model_a.training


def test_toy_model_is_small() -> None:
    count = sum(p.numel() for p in toy.ToyNet().parameters())
    assert 30_000 < count < 120_000
    assert toy.ToyNet()(torch.rand(2, 3, 64, 64)).shape == (2, 4)


def test_pointing_hits_and_mask_energy() -> None:
    maps = torch.zeros(2, 8, 8)
    maps[0, 2, 2] = 1.0
    maps[1, 6, 6] = 1.0
    masks = torch.zeros(2, 8, 8, dtype=torch.bool)
    masks[:, 2, 3] = True
    assert pointing_hits(maps, masks, dilation=0).tolist() == [False, False]
    assert pointing_hits(maps, masks, dilation=1).tolist() == [True, False]
    assert mask_energy(maps, masks).tolist() == [0.0, 0.0]
    assert mask_energy(torch.zeros(1, 4, 4), masks[:1, :4, :4]).tolist() == [0.0]  # never NaN


def test_cli_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["version"]) == 0
    assert capsys.readouterr().out.startswith("finercam 0.1.0")


def test_python_dash_m_runs() -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "finercam", "version"], capture_output=True, text=True, check=False, timeout=120
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.startswith("finercam ")


def test_cli_example_end_to_end(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    argv = ["example", "--out", str(tmp_path / "out"), "--epochs", "2", "--train-size", "1200",
            "--test-size", "200", "--eval-size", "24", "--seed", "1", "--threads", "1"]
    threads = torch.get_num_threads()
    assert main(argv) == 0
    assert torch.get_num_threads() == threads, "the command restores torch's thread count"
    printed = capsys.readouterr().out
    png = tmp_path / "out" / "example.png"
    assert str(png) in printed and "pointing-game hit rate" in printed
    with Image.open(png) as image:
        image.load()
        assert image.format == "PNG" and image.width > 600 and image.height > 600
    report = json.loads((tmp_path / "out" / "example.json").read_text())
    assert 0 <= report["test_accuracy"] <= 1
    assert report["pointing_game"]["images"] == 24
    for rates in (v for k, v in report["pointing_game"].items() if k.startswith("dilation_")):
        assert 0 <= rates["baseline"] <= 1 and 0 <= rates["finer"] <= 1
    assert len(report["examples"]) == 6 and report["figure"] == str(png)


def test_viz_without_matplotlib_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    from finercam import viz

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(viz.MissingDependencyError, match=r"pip install finercam\[viz\]"):
        viz.overlay(torch.rand(3, 8, 8), torch.rand(8, 8))


def test_commands_that_draw_figures_say_so_before_any_work(monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from finercam.cli import main

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the missing matplotlib was reported")

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setattr("finercam.models.load_model", never)
    monkeypatch.setattr("finercam.concepts.loading.load_clip", never)
    for command in (["explain", "any.png", "--model", "embedded:cnn"], ["concepts", "any.png", "--concept", "red beak",
                                                                       "--versus", "bird"]):
        assert main(command) == 1  # a missing dependency, as the CLI reports every one
        assert "pip install finercam[viz]" in capsys.readouterr().err


def test_overlay_blends_into_unit_range() -> None:
    from finercam import viz

    blended = viz.overlay(torch.rand(3, 8, 8), torch.rand(8, 8), alpha=0.4, cmap="inferno")
    assert blended.shape == (8, 8, 3) and blended.min() >= 0 and blended.max() <= 1
    with pytest.raises(ValueError, match="resize"):
        viz.overlay(torch.rand(3, 8, 8), torch.rand(4, 4))
