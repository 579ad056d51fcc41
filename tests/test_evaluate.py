"""Issue 5: deletion / insertion, fills, localization from boxes / keypoints / CUB files, bootstrap intervals,
``finercam evaluate`` (resumable, reproduces the demo) — against values computed by hand."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from finercam import synth
from finercam.cli import main
from finercam.demo import run_demo
from finercam.embedded import load_embedded
from finercam.evaluation.annotations import load_regions, transform_mask
from finercam.evaluation.runner import PROGRESS, EvaluationOptions, evaluate_dataset
from finercam.evaluation.scoring import ScoreOptions, score_sweep
from finercam.explain import FinerCAM
from finercam.metrics import (
    bootstrap,
    boxes_to_masks,
    deletion_insertion,
    fill_images,
    keypoints_to_masks,
    mask_energy,
    pointing_hits,
    relative_confidence_drop,
)
from finercam.models.preprocess import PREPROCESS_PRESETS, Preprocess
from metric_cases import pixel_case, softmax


def test_deletion_and_insertion_by_hand() -> None:
    """Two steps: 0, 8 and 16 pixels. The top 8 are 0, 1, 5 then the tied zeros 2, 3, 4, 6, 7 (row-major)."""
    model, images, saliency = pixel_case()
    clean, flat = softmax([2, 1, 0]), [1 / 3] * 3
    deletion = deletion_insertion(model, images, saliency, torch.tensor([0]), torch.tensor([[1]]), "deletion",
                                  steps=2, fill="zero")
    assert deletion.fractions.tolist() == [0, 0.5, 1]
    assert deletion.target[0].tolist() == pytest.approx([clean[0], flat[0], flat[0]], abs=1e-6)
    assert deletion.reference[0].tolist() == pytest.approx([clean[1], flat[1], flat[1]], abs=1e-6)
    expected = 0.5 * (clean[0] + flat[0]) / 2 + 0.5 * flat[0]
    assert float(deletion.target_auc[0]) == pytest.approx(expected, abs=1e-6)
    insertion = deletion_insertion(model, images, saliency, torch.tensor([0]), torch.tensor([[1]]), "insertion",
                                   steps=2, fill="zero")
    assert insertion.target[0].tolist() == pytest.approx([flat[0], clean[0], clean[0]], abs=1e-6)
    assert float(insertion.target_auc[0]) > float(deletion.target_auc[0])


def test_deletion_batches_steps_into_few_passes() -> None:
    model, images, saliency = pixel_case()
    images, saliency = images.repeat(4, 1, 1, 1), saliency.repeat(4, 1, 1)
    targets, references = torch.zeros(4, dtype=torch.long), torch.ones(4, 1, dtype=torch.long)
    one = deletion_insertion(model, images, saliency, targets, references, steps=10, fill="zero")
    assert model.calls == [4] * 11  # default: one pass of the batch per step
    model.calls.clear()
    many = deletion_insertion(model, images, saliency, targets, references, steps=10, fill="zero", batch_size=24)
    assert model.calls == [24, 20]  # six steps of four images per pass
    torch.testing.assert_close(one.target, many.target)


def test_fills() -> None:
    images = torch.rand(2, 3, 9, 11)
    torch.testing.assert_close(fill_images(images, "image-mean"), images.mean(dim=(2, 3), keepdim=True))
    assert float(fill_images(images, "zero").abs().sum()) == 0
    torch.testing.assert_close(fill_images(images, "mean", (0.1, 0.2, 0.3)).flatten(), torch.tensor([0.1, 0.2, 0.3]))
    constant = torch.full((1, 3, 9, 11), 0.4)
    torch.testing.assert_close(fill_images(constant, "blur", blur_sigma=2.0), constant)  # blur keeps constants
    blurred = fill_images(images, "blur", blur_sigma=1.5)
    assert blurred.shape == images.shape and float(blurred.std()) < float(images.std())  # and smooths the rest


def test_a_blur_fill_that_removes_nothing_drops_nothing() -> None:
    """The documented direction of ``blur_sigma``: the smaller it is, the closer the fill is to the image, and at the
    limit masking changes nothing, so RD is 0."""
    model, images, saliency = pixel_case()
    images = torch.rand(1, 1, 4, 4)
    tiny = relative_confidence_drop(model, images, saliency, torch.tensor([0]), torch.tensor([[1]]), (0.25,),
                                    fill="blur", blur_sigma=1e-6)
    wide = relative_confidence_drop(model, images, saliency, torch.tensor([0]), torch.tensor([[1]]), (0.25,),
                                    fill="blur", blur_sigma=3.0)
    assert abs(float(tiny[0.25][0])) < 1e-6 < abs(float(wide[0.25][0]))


def test_boxes_and_keypoints_by_hand() -> None:
    boxes = torch.tensor([[[1.0, 0.0, 3.0, 2.0], [0.0, 3.0, 1.0, 4.0]]])
    masks = boxes_to_masks(boxes, torch.tensor([[True, False]]), (4, 4))
    expected = torch.zeros(1, 4, 4, dtype=torch.bool)
    expected[0, 0:2, 1:3] = True
    assert torch.equal(masks, expected)
    points = keypoints_to_masks(torch.tensor([[[2.7, 1.2]]]), None, (4, 4))
    assert points.nonzero().tolist() == [[0, 1, 2]]
    disk = keypoints_to_masks(torch.tensor([[[2.0, 2.0]]]), None, (5, 5), radius=1.0)
    assert int(disk.sum()) == 4  # the four pixel centres at distance sqrt(0.5)
    maps = torch.zeros(1, 4, 4)
    maps[0, 3, 3] = 1.0
    assert not bool(pointing_hits(maps, expected, 0)[0]) and not bool(pointing_hits(maps, expected, 1)[0])
    assert bool(pointing_hits(maps, expected | (torch.arange(16).view(1, 4, 4) == 10), 1)[0])  # (2, 2) within 1 px
    maps[0, 0, 1] = 3.0
    assert float(mask_energy(maps, expected)[0]) == pytest.approx(0.75)


def test_point_transform_follows_the_pixels() -> None:
    """A bright pixel drawn on the original image lands where ``point_transform`` says, for resize + crop."""
    image = Image.new("RGB", (500, 375))
    image.putpixel((300, 100), (255, 255, 255))
    presets = (PREPROCESS_PRESETS["imagenet"], Preprocess("x", resize=(64, 80)), Preprocess("crop", crop=(600, 300)))
    for preprocess in presets:
        tensor = preprocess(image)
        sx, sy, dx, dy = preprocess.point_transform(500, 375)
        x, y = (300 + 0.5) * sx + dx, (100 + 0.5) * sy + dy
        grey = tensor.mean(dim=0)
        found = divmod(int(grey.flatten().argmax()), grey.shape[1])
        assert abs(found[0] + 0.5 - y) <= 1.0 and abs(found[1] + 0.5 - x) <= 1.0, preprocess.name
        mask = torch.zeros(375, 500, dtype=torch.bool)
        mask[100, 300] = True
        carried = transform_mask(mask, preprocess, tuple(grey.shape))
        if carried.any():
            assert (carried.nonzero()[0] - torch.tensor(found)).abs().max() <= 1


def test_bootstrap() -> None:
    values = torch.tensor([[1.0, 5.0], [2.0, 5.0], [3.0, float("nan")], [6.0, 5.0]])
    mean, constant = bootstrap(values, resamples=500)
    assert mean.mean == pytest.approx(3.0) and mean.n == 4 and mean.low < 3.0 < mean.high
    assert (constant.mean, constant.low, constant.high, constant.n) == (5.0, 5.0, 5.0, 3)
    narrow = bootstrap(torch.randn(4000, generator=torch.Generator().manual_seed(0)), resamples=300)[0]
    wide = bootstrap(torch.randn(40, generator=torch.Generator().manual_seed(0)), resamples=300)[0]
    assert narrow.high - narrow.low < (wide.high - wide.low) / 5  # about sqrt(100) = 10 times narrower
    assert narrow.low < 0 < narrow.high


def _cub(tmp_path: Path) -> tuple[Path, Path]:
    """A two-image CUB-200-2011 folder (100 x 80 images) whose images are also an ImageFolder tree."""
    root = tmp_path / "CUB_200_2011"
    for name, colour in (("001.Albatross/a.jpg", (200, 30, 30)), ("002.Auklet/b.jpg", (30, 200, 30))):
        (root / "images" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (100, 80), colour).save(root / "images" / name)
    (root / "images.txt").write_text("1 001.Albatross/a.jpg\n2 002.Auklet/b.jpg\n")
    (root / "bounding_boxes.txt").write_text("1 10.0 20.0 30.0 40.0\n2 0.0 0.0 50.0 40.0\n")
    (root / "parts").mkdir()
    (root / "parts" / "part_locs.txt").write_text("1 1 15.0 25.0 1\n1 2 0.0 0.0 0\n2 1 60.0 70.0 1\n")
    return root, root / "images"


def test_cub_files_become_regions(tmp_path: Path) -> None:
    root, images = _cub(tmp_path)
    from finercam.evaluation.annotations import ImageItem

    items = [ImageItem(images / "001.Albatross/a.jpg", 100, 80), ImageItem(images / "002.Auklet/b.jpg", 100, 80)]
    identity = Preprocess("none")
    none = torch.zeros(2, dtype=torch.long)
    boxes, valid = load_regions(root).masks(items, identity, (80, 100), none, none, None)
    assert valid.tolist() == [True, True]
    corners = boxes[0].nonzero()
    assert corners.min(0).values.tolist() == [20, 10] and corners.max(0).values.tolist() == [59, 39]
    assert int(boxes[1].sum()) == 50 * 40
    parts, valid = load_regions(root, "parts", keypoint_radius=0).masks(items, identity, (80, 100), none, none, None)
    assert parts[0].nonzero().tolist() == [[25, 15]]  # the invisible part is left out
    assert parts[1].nonzero().tolist() == [[70, 60]]
    half = Preprocess("half", resize=(40, 50))
    boxes, _ = load_regions(root).masks(items, half, (40, 50), none, none, None)
    corners = boxes[0].nonzero()
    assert corners.min(0).values.tolist() == [10, 5] and corners.max(0).values.tolist() == [29, 19]


def test_a_copy_of_a_cub_split_is_matched_by_class_folder_and_file(tmp_path: Path) -> None:
    """As the README's command: --data is a copy of the test split, --annotations the CUB folder."""
    import shutil

    from finercam.evaluation.annotations import ImageItem, check_coverage

    root, images = _cub(tmp_path)
    split = tmp_path / "cub" / "test"
    shutil.copytree(images / "002.Auklet", split / "002.Auklet")
    (split / "003.Other").mkdir()
    Image.new("RGB", (100, 80)).save(split / "003.Other" / "b.jpg")  # same file name, another class: no region
    regions = load_regions(root)
    copies = [split / "002.Auklet" / "b.jpg", split / "003.Other" / "b.jpg"]
    assert regions.annotated(copies) == [True, False]
    items = [ImageItem(path, 100, 80) for path in copies]
    none = torch.zeros(2, dtype=torch.long)
    masks, valid = regions.masks(items, Preprocess("none"), (80, 100), none, none, None)
    original, _ = regions.masks([ImageItem(images / "002.Auklet" / "b.jpg", 100, 80)],
                                Preprocess("none"), (80, 100), none[:1], none[:1], None)
    assert valid.tolist() == [True, False] and torch.equal(masks[0], original[0])
    assert "1 of 2 images have no annotation" in check_coverage(regions, copies, root)


def test_regions_reject_bad_files(tmp_path: Path) -> None:
    from finercam.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match="not found"):
        load_regions(tmp_path / "nothing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(InvalidArgumentError, match="not valid JSON"):
        load_regions(tmp_path / "bad.json")
    (tmp_path / "odd.json").write_text('{"images": []}')
    with pytest.raises(InvalidArgumentError, match="expected"):
        load_regions(tmp_path / "odd.json")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    config = load_embedded("cnn").card["data"]["config"]
    synth.write_dataset(root, train=0, test=24, seed=8128, species_per_genus=config["species_per_genus"])
    return root


def _evaluate(synthetic: Path, out: Path, *extra: str) -> dict:
    code = main(["evaluate", "--model", "embedded:cnn", "--data", str(synthetic / "test"), "--annotations",
                 str(synthetic / "annotations.json"), "--out", str(out), "--resamples", "200", *extra])
    assert code == 0
    return json.loads((out / "results.json").read_text())


def test_evaluate_reproduces_the_demo(synthetic: Path, tmp_path: Path) -> None:
    """The demo's test set of seed S is ``finercam synth --seed S``'s test split: same images, same numbers."""
    args = argparse.Namespace(out=str(tmp_path / "demo"), size=24, seed=8128, models=["cnn"], methods=["gradcam"],
                              tolerance=2, batch_size=24, score_batch_size=256, threads=0,
                              aggregations=["mean"])
    run_demo(args)
    demo = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert args.seed == 8128  # not moved: the comparison is on the same images
    result = _evaluate(synthetic, tmp_path / "eval", "--metrics", "pointing", "energy", "rd", "--batch-size", "10")
    for record in demo:
        row = next(r for r in result["rows"] if r["method"] == record["method"] and r["gamma"] == record["gamma"])
        for name in ("pointing", "energy", "rd@0.05", "rd@0.10"):
            assert row["metrics"][name]["mean"] == pytest.approx(record[name], abs=6e-5), (name, record["gamma"])
    assert (tmp_path / "eval" / "results.md").read_text().count("| Finer-Grad-CAM |") == 8
    csv_lines = (tmp_path / "eval" / "results.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + 5 * 4


def test_evaluate_resumes_after_a_crash(synthetic: Path, tmp_path: Path) -> None:
    options = ("--metrics", "rd", "deletion", "--steps", "4", "--batch-size", "5", "--gammas", "0.6")
    whole = _evaluate(synthetic, tmp_path / "whole", *options)
    out = tmp_path / "cut"
    _evaluate(synthetic, out, *options)
    lines = (out / PROGRESS).read_bytes().splitlines(keepends=True)
    (out / PROGRESS).write_bytes(b"".join(lines[:2]) + lines[2][:37])  # two batches done, the third cut short
    resumed = _evaluate(synthetic, out, *options)
    assert resumed["rows"] == whole["rows"] and resumed["curves"] == whole["curves"]
    assert len((out / PROGRESS).read_text().splitlines()) == 5  # 24 images in batches of 5
    code = main(["evaluate", "--model", "embedded:cnn", "--data", str(synthetic / "test"), "--out", str(out),
                 "--metrics", "rd", "--gammas", "1"])
    assert code == 2  # other options on a partial run: refused, not mixed


def test_correct_only_and_tolerance_directions(synthetic: Path, tmp_path: Path) -> None:
    loose = _evaluate(synthetic, tmp_path / "loose", "--metrics", "pointing", "--tolerance", "4", "--gammas", "0.6")
    tight = _evaluate(synthetic, tmp_path / "tight", "--metrics", "pointing", "--tolerance", "0", "--gammas", "0.6")
    for a, b in zip(loose["rows"], tight["rows"], strict=True):
        assert a["metrics"]["pointing"]["mean"] >= b["metrics"]["pointing"]["mean"]
    assert loose["rows"][0]["metrics"]["pointing"]["mean"] > tight["rows"][0]["metrics"]["pointing"]["mean"]
    only = _evaluate(synthetic, tmp_path / "only", "--metrics", "pointing", "--correct-only", "--gammas", "0.6")
    assert only["options"]["correct_only"] and only["n_images"] == round(only["accuracy"] * 24)


def test_random_maps_score_worse_than_finer_cam() -> None:
    """On the synthetic benchmark, Finer-Grad-CAM beats random maps on the pointing game and on RD@5%."""
    embedded = load_embedded("cnn")
    data = synth.generate(96, seed=4242, species_per_genus=embedded.card["data"]["config"]["species_per_genus"])
    cam = FinerCAM(embedded.model, embedded.target_layer)
    sweep = cam.sweep(data.images, [0.6])
    difference = data.difference_mask(sweep.targets, sweep.references[:, 0])
    options = ScoreOptions(metrics=("pointing", "rd"), fill_mean=embedded.mean)
    finer = score_sweep(embedded.model, data.images, sweep, options, difference).values[0]
    noise = torch.rand(sweep.maps.shape, generator=torch.Generator().manual_seed(0))
    random = score_sweep(embedded.model, data.images, type(sweep)(**{**sweep.__dict__, "maps": noise}), options,
                         difference).values[0]
    assert float(finer["pointing"].mean()) > 2 * float(random["pointing"].mean())
    assert float(finer["rd@0.05"].mean()) > float(random["rd@0.05"].mean()) + 0.1


def test_rd_of_an_evaluation_costs_three_passes_per_batch() -> None:
    """One forward for the sweep (whose logits RD reuses), then one per k: at most three passes of the batch."""
    embedded = load_embedded("cnn")
    calls: list[int] = []
    handle = embedded.model.register_forward_pre_hook(lambda _m, args: calls.append(int(args[0].shape[0])))
    try:
        data = synth.generate(12, seed=5)
        sweep = FinerCAM(embedded.model, embedded.target_layer).sweep(data.images, [0.6])
        assert calls == [12]
        score_sweep(embedded.model, data.images, sweep, ScoreOptions(metrics=("rd",), fill_mean=embedded.mean))
        assert calls == [12, 12, 12]
    finally:
        handle.remove()


def test_evaluate_api_skips_unreadable_files(tmp_path: Path) -> None:
    embedded = load_embedded("cnn")
    data = synth.generate(3, seed=9)
    paths = []
    for i in range(3):
        path = tmp_path / f"{i}.png"
        Image.fromarray((data.images[i] * 255).round().byte().permute(1, 2, 0).numpy()).save(path)
        paths.append((path, None))
    (tmp_path / "broken.png").write_bytes(b"not a png")
    options = EvaluationOptions(gammas=(0.6,), layer=embedded.target_layer, batch_size=2,
                                score=ScoreOptions(metrics=("rd",), fill_mean=embedded.mean))
    records = evaluate_dataset(embedded.model, Preprocess("none"), [*paths, (tmp_path / "broken.png", None)],
                               tmp_path / "out", options, progress=False)
    assert sum(len(r["images"]) for r in records) == 3
    assert [s["path"] for r in records for s in r["skipped"]] == [str(tmp_path / "broken.png")]


def test_evaluate_cli_errors(synthetic: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["evaluate", "--model", "embedded:cnn", "--data", str(synthetic / "test"), "--out", str(tmp_path)]
    assert main([*base, "--annotations", str(tmp_path / "missing.json")]) == 2
    assert "not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--fill", "purple"])
    assert "must be one of" in capsys.readouterr().err
    assert main([*base, "--annotations", str(synthetic / "annotations.json"), "--regions", "box"]) == 2
    assert "difference" in capsys.readouterr().err


def test_images_of_different_sizes_are_explained_in_groups(tmp_path: Path) -> None:
    """Without a crop, sizes differ within a batch: each size group is explained on its own, and every image gets
    the values it gets when explained alone."""
    embedded = load_embedded("cnn")
    data = synth.generate(4, seed=11, species_per_genus=8)
    paths = []
    for i in range(4):
        path = tmp_path / f"{i}.png"
        picture = Image.fromarray((data.images[i] * 255).round().byte().permute(1, 2, 0).numpy())
        (picture if i % 2 else picture.resize((80, 48))).save(path)
        paths.append((path, None))
    options = {"gammas": (0.6,), "layer": embedded.target_layer,
               "score": ScoreOptions(metrics=("rd",), fill_mean=embedded.mean)}
    together = evaluate_dataset(embedded.model, Preprocess("none"), paths, tmp_path / "together",
                                EvaluationOptions(batch_size=4, **options), progress=False)
    alone = evaluate_dataset(embedded.model, Preprocess("none"), paths, tmp_path / "alone",
                             EvaluationOptions(batch_size=1, **options), progress=False)

    def per_image(records: list[dict]) -> dict[str, tuple]:
        table = {}
        for record in records:
            values = record["values"]["gradcam"]["0.6"]
            for j, image in enumerate(record["images"]):
                table[image["path"]] = (image["target"], image["reference"], values["rd@0.05"][j], values["rd@0.10"][j])
        return table

    grouped, single = per_image(together), per_image(alone)
    assert len(together) == 1 and set(grouped) == {str(p) for p, _ in paths}
    for path, (c, d, rd5, rd10) in single.items():
        assert grouped[path][:2] == (c, d)
        assert grouped[path][2:] == pytest.approx((rd5, rd10), abs=1e-5)
