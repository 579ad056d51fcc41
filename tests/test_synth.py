"""The procedural fine-grained dataset: masks align with pixels, siblings differ only inside their difference mask,
determinism, occlusion, the ImageFolder + annotation round trip and ``finercam synth``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from finercam.cli import main
from finercam.errors import InvalidArgumentError
from finercam.synth import (
    MAX_PART_FRACTION,
    PARTS,
    SMALL_PARTS,
    SynthArgumentError,
    SynthConfig,
    SynthDataset,
    class_attributes,
    difference_mask,
    differing_parts,
    generate,
    load_dataset,
    render,
    species_of,
    write_dataset,
)
from finercam.synth.io import load_annotations, split_seeds
from finercam.synth.spec import discriminative_parts

N = 96


@pytest.fixture(scope="module")
def data() -> SynthDataset:
    return generate(N, seed=3)


def test_shapes_balance_and_classes(data: SynthDataset) -> None:
    config = data.config
    assert config.num_classes == 12 and len(data.class_names) == 12
    assert data.images.shape == (N, 3, 64, 64) and data.images.dtype == torch.float32
    assert float(data.images.min()) >= 0 and float(data.images.max()) <= 1
    assert torch.bincount(data.labels, minlength=12).tolist() == [N // 12] * 12
    assert torch.equal(data.genus, data.labels // config.species_per_genus)
    assert data.part_map.shape == (N, 64, 64) and data.part_map.dtype == torch.uint8
    assert set(data.part_masks) == set(PARTS)
    assert torch.equal(data.object_mask, torch.stack(list(data.part_masks.values())).any(0))
    assert sorted(data.class_names) == data.class_names  # ImageFolder's sorted folders give the labels
    assert class_attributes(1) == {"genus": "finch", **species_of(config)[1].values}
    assert class_attributes(1)["beak"] != class_attributes(0)["beak"]


@pytest.mark.parametrize("part", PARTS)
def test_recolouring_a_part_changes_exactly_its_visible_mask(data: SynthDataset, part: str) -> None:
    assert data.individuals is not None
    images, part_map = render(data.individuals, data.labels, data.config, recolour={part: (0.5, 0.0, 1.0)})
    assert torch.equal(part_map, data.part_map)
    changed = (images != data.images).any(dim=1)
    assert torch.equal(changed, data.part_masks[part])


def test_same_seed_same_bytes_and_subsets_render_alike(data: SynthDataset) -> None:
    again = generate(N, seed=3)
    assert torch.equal(again.images, data.images) and torch.equal(again.part_map, data.part_map)
    assert torch.equal(again.labels, data.labels)
    other = generate(N, seed=4)
    assert not torch.equal(other.images, data.images) and not torch.equal(other.labels, data.labels)
    assert data.individuals is not None
    index = torch.tensor([5, 70, 2])
    images, part_map = render(data.individuals[index], data.labels[index], data.config)
    assert torch.equal(images, data.images[index]) and torch.equal(part_map, data.part_map[index])


@pytest.mark.parametrize("species", range(4))
def test_siblings_differ_exactly_inside_their_difference_mask(data: SynthDataset, species: int) -> None:
    """Re-rendering each individual as a sibling species changes exactly the pixels of their difference mask."""
    assert data.individuals is not None
    sibling = data.genus * data.config.species_per_genus + species
    images, part_map = render(data.individuals, sibling, data.config)
    assert torch.equal(part_map, data.part_map), "part masks do not depend on the species"
    changed = (images != data.images).any(dim=1)
    expected = data.difference_mask(data.labels, sibling)
    assert torch.equal(changed, expected)
    differs = data.labels != sibling
    assert bool(expected.flatten(1).any(1)[differs].all()), "every sibling pair differs somewhere visible"


def test_differing_parts_are_small_and_visible() -> None:
    """Each part that tells two siblings apart covers at most MAX_PART_FRACTION of the image (checked at the largest
    scale, unoccluded) and stays visible under occlusion."""
    largest = generate(2 * N, seed=5, scale=(0.21, 0.21), occlusion=0.0, num_genera=5, species_per_genus=12)
    fractions = torch.stack([mask.float().mean(dim=(1, 2)) for mask in largest.part_masks.values()], 1)
    small = [PARTS.index(part) for part in SMALL_PARTS]
    assert float(fractions[:, small].max()) <= MAX_PART_FRACTION
    data = generate(2 * N, seed=6, occlusion=1.0)
    for genus in range(data.config.num_genera):
        rows = data.genus == genus
        for part in discriminative_parts(data.config, genus):
            fraction = data.part_masks[part][rows].float().mean(dim=(1, 2))
            assert float(fraction.min()) > 0.001, (genus, part)
    for a in range(12):
        for b in range(12):
            if a // 4 == b // 4 and a != b:
                assert set(differing_parts(data.config, a, b)) <= set(SMALL_PARTS)


def test_difference_mask_is_the_union_of_differing_parts(data: SynthDataset) -> None:
    masks = data.part_masks
    assert not data.difference_mask(2, 2).any()
    assert torch.equal(data.difference_mask(0, 1), masks["beak"])  # finch: yellow vs black beak
    assert torch.equal(data.difference_mask(0, 3), masks["beak"] | masks["wingbar"])
    assert torch.equal(data.difference_mask(4, 7), masks["eyering"] | masks["throat"])  # warbler
    assert torch.equal(data.difference_mask(8, 10), masks["tailtip"])  # jay
    assert torch.equal(data.difference_mask(0, 11), data.object_mask), "across genera the whole bird differs"
    assert torch.equal(difference_mask(masks, data.labels, 5), data.difference_mask(data.labels, 5))
    assert not (data.difference_mask(0, 11) & data.occluder_mask).any()


def test_occlusion_only_removes_visible_pixels() -> None:
    clear, hidden = generate(N, seed=7, occlusion=0.0), generate(N, seed=7, occlusion=1.0)
    assert torch.equal(clear.labels, hidden.labels) and not clear.occluder_mask.any()
    occluded = hidden.occluder_mask
    assert float(occluded.flatten(1).any(1).float().mean()) > 0.8
    assert bool((hidden.object_mask & ~clear.object_mask).sum() == 0)
    lost = (clear.object_mask & ~hidden.object_mask).flatten(1).sum(1)
    assert float((lost > 0).float().mean()) > 0.5, "occluders usually hide part of the bird"
    same = ~occluded
    assert torch.equal(hidden.part_map[same], clear.part_map[same])
    assert torch.equal(hidden.images.permute(0, 2, 3, 1)[same], clear.images.permute(0, 2, 3, 1)[same])
    for genus in range(3):  # an occluder never hides more than 1 - min_visible of a species-telling part
        rows = hidden.genus == genus
        for part in discriminative_parts(hidden.config, genus):
            before = clear.part_masks[part][rows].flatten(1).sum(1).float()
            after = hidden.part_masks[part][rows].flatten(1).sum(1).float()
            assert bool((after >= hidden.config.min_visible * before).all()), part


def test_write_and_load_round_trip(tmp_path: Path) -> None:
    config = SynthConfig(image_size=48, species_per_genus=2)
    path = write_dataset(tmp_path, train=12, test=6, seed=1, config=config)
    assert path == tmp_path / "annotations.json"
    annotation = load_annotations(tmp_path)
    assert annotation["split_seeds"] == split_seeds(1) and len(annotation["images"]) == 18
    assert annotation["differing_parts"][0][1] == list(differing_parts(config, 0, 1))
    for split, count in (("train", 12), ("test", 6)):
        loaded = load_dataset(tmp_path, split)
        fresh = generate(count, split_seeds(1)[split], config)
        assert loaded.config == config and loaded.individuals is None
        assert torch.equal(loaded.labels, fresh.labels) and torch.equal(loaded.genus, fresh.genus)
        assert torch.equal(loaded.part_map, fresh.part_map)
        assert float((loaded.images - fresh.images).abs().max()) <= 0.5 / 255 + 1e-6
        folders = sorted(p.name for p in (tmp_path / split).iterdir())
        assert folders == loaded.class_names  # every class present, in label order
        assert sum(1 for _ in (tmp_path / split).rglob("*.png")) == count
    with pytest.raises(SynthArgumentError, match="overwrite"):
        write_dataset(tmp_path, train=2, test=0, config=config)
    write_dataset(tmp_path, train=2, test=0, config=config, overwrite=True)
    assert not (tmp_path / "test").exists() and len(load_dataset(tmp_path, "train")) == 2


def test_cli_synth(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "birds"
    assert main(["synth", "--out", str(out), "--train", "24", "--test", "12", "--seed", "2"]) == 0
    assert "00-finch-yellow_beak-plain_wingbar" in capsys.readouterr().out
    assert (out / "preview.png").is_file() and len(list((out / "train").rglob("*.png"))) == 24
    assert json.loads((out / "annotations.json").read_text())["seed"] == 2
    assert main(["synth", "--out", str(out), "--species", "99"]) == 2
    assert "--species 99 is not allowed: expected an int from 1 to" in capsys.readouterr().err
    assert main(["synth", "--out", str(out), "--scale", "0.3", "0.2"]) == 2
    assert "--scale 0.3 0.2 is not allowed: expected a pair (low, high)" in capsys.readouterr().err


@pytest.mark.parametrize(
    "call",
    [
        lambda: SynthConfig(image_size=16),
        lambda: SynthConfig(num_genera=6),
        lambda: SynthConfig(scale=(0.2, 0.1)),
        lambda: SynthConfig(scale=0.2),  # type: ignore[arg-type]
        lambda: generate(-1),
        lambda: generate(4, colour="red"),
        lambda: difference_mask(torch.zeros(1, 8, 8, dtype=torch.uint8), 0, 12),
        lambda: difference_mask(torch.zeros(2, 8, 8, dtype=torch.uint8), 0, torch.tensor([1, 2, 3])),
        lambda: class_attributes(12),
        lambda: load_dataset(Path("/nonexistent-synth")),
    ],
)
def test_bad_arguments_raise_clear_errors(call: object) -> None:
    with pytest.raises(InvalidArgumentError):
        call()  # type: ignore[operator]


def test_rendering_as_another_genus_is_refused(data: SynthDataset) -> None:
    assert data.individuals is not None
    finch = data.individuals[data.genus == 0]
    with pytest.raises(SynthArgumentError, match="own genus"):
        render(finch, 4, data.config)
    with pytest.raises(SynthArgumentError, match="unknown parts"):
        render(finch, 0, data.config, recolour={"tentacle": (0.0, 0.0, 0.0)})
