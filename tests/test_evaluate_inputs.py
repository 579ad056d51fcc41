"""``finercam evaluate`` with bad or partial inputs: every mistake is refused up front with a message naming it, never
a traceback half-way through, never n/a or NaN reported as if normal; a resume may change the batch sizes only."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from finercam import synth
from finercam.cli import main
from finercam.embedded import load_embedded
from finercam.errors import InvalidArgumentError
from finercam.evaluation.annotations import ImageItem, check_coverage, load_regions
from finercam.evaluation.runner import PROGRESS, EvaluationOptions, evaluate_dataset
from finercam.evaluation.scoring import ScoreOptions
from finercam.evaluation.summary import csv_text, strict_json, summarize
from finercam.metrics import fill_images
from finercam.models.preprocess import Preprocess

FIRST = "test/00-finch-yellow_beak-plain_wingbar-plain_crown/00010.png"  # seed 8128's first test image (64 x 64)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    synth.write_dataset(root, train=0, test=24, seed=8128, species_per_genus=8)
    assert (root / FIRST).is_file()
    return root


def _evaluate(data: Path, out: Path, *extra: str) -> int:
    return main(["evaluate", "--model", "embedded:cnn", "--data", str(data), "--out", str(out), "--resamples", "50",
                 "--gammas", "0.6", *extra])


def _strict(text: str) -> dict:
    def refuse(constant: str) -> None:
        raise AssertionError(f"results.json holds {constant}, which is not JSON")

    return json.loads(text, parse_constant=refuse)


# 1. annotations that match none or only some of the images


def test_annotations_of_no_image_are_refused_before_the_run(synthetic: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    moved = tmp_path / "moved"
    shutil.copytree(synthetic / "test", moved)
    out = tmp_path / "ev"
    code = _evaluate(moved, out, "--annotations", str(synthetic / "annotations.json"), "--metrics", "pointing",
                     "energy")
    assert code == 2
    error = capsys.readouterr().err
    assert "0 of 24 images have annotations" in error
    assert f"paths are matched relative to {str(synthetic)!r}" in error and "is not under it" in error
    assert not out.exists()  # refused before any work
    (tmp_path / "empty.json").write_text('{"images": {}}')
    assert _evaluate(synthetic / "test", out, "--annotations", str(tmp_path / "empty.json"), "--metrics",
                     "pointing") == 2
    assert "0 of 24 images have annotations" in capsys.readouterr().err


def test_partial_annotations_are_noted_and_counted(synthetic: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    paths = sorted((synthetic / "test").rglob("*.png"))[:5]
    regions = {"images": {p.relative_to(synthetic).as_posix(): {"boxes": [[8, 8, 40, 40]]} for p in paths}}
    (synthetic / "some.json").write_text(json.dumps(regions))
    out = tmp_path / "ev"
    assert _evaluate(synthetic / "test", out, "--annotations", str(synthetic / "some.json"), "--metrics",
                     "pointing", "energy") == 0
    printed = capsys.readouterr().out
    assert "note: 19 of 24 images have no annotation" in printed and "left out of pointing and energy" in printed
    result = _strict((out / "results.json").read_text())
    assert {row["metrics"]["pointing"]["n"] for row in result["rows"]} == {5}
    assert "pointing: over 5 of 24 images" in (out / "results.md").read_text()


def test_results_without_values_are_strict_json() -> None:
    """A metric no image has a value of is ``null`` in results.json, never the bare ``NaN`` JSON parsers refuse."""
    record = {"indices": [0, 1], "skipped": [], "curves": {},
              "images": [{"correct": True, "index": 0}, {"correct": True, "index": 1}],
              "values": {"gradcam": {g: {"pointing": [None, None], "rd@0.05": [0.1, 0.3], "empty": [0.0, 0.0]}
                                     for g in ("0", "0.6")}}}
    summary = summarize([record], ("gradcam",), (0.0, 0.6), resamples=20)
    assert math.isnan(summary.rows[0]["metrics"]["pointing"]["mean"])
    text = json.dumps(strict_json({"rows": summary.rows}), allow_nan=False)
    assert _strict(text)["rows"][0]["metrics"]["pointing"] == {"mean": None, "low": None, "high": None, "n": 0}
    pointing = next(line for line in csv_text(summary).splitlines() if line.startswith("gradcam,0,False,pointing"))
    assert pointing == "gradcam,0,False,pointing,True,,,,0,,,,0.000000"  # empty cells, not "nan"


# 2. localization without annotations


def test_localization_metrics_need_annotations(synthetic: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ev"
    assert _evaluate(synthetic / "test", out, "--metrics", "pointing", "rd") == 2
    assert "--metrics pointing needs --annotations" in capsys.readouterr().err
    assert not out.exists()
    embedded = load_embedded("cnn")
    options = EvaluationOptions(score=ScoreOptions(metrics=("energy",), fill_mean=embedded.mean))
    with pytest.raises(InvalidArgumentError, match=r"\['energy'\] need ground-truth regions"):
        evaluate_dataset(embedded.model, Preprocess("none"), [], out, options, progress=False)


# 3. bad region annotations


@pytest.mark.parametrize(("entry", "message"), [
    ({"boxes": [[10, 10, 40]]}, r"\.boxes\[0\] must be \[x0, y0, x1, y1\].*got \[10, 10, 40\]"),
    ({"boxes": "abc"}, r"\.boxes must be a list of boxes.*got 'abc'"),
    ([1, 2], r" must be an object .*got a list"),
    ({"keypoints": [[1, 2, 3]]}, r"\.keypoints\[0\] must be \[x, y\].*got \[1, 2, 3\]"),
    ({"mask": "nope.png"}, r"\.mask: the mask image '.*nope\.png' does not exist"),
    ({"mask": "bad.png"}, r"\.mask: '.*bad\.png' is not an image"),
    ({"boxes": [[40, 40, 10, 10]]}, r"\.boxes\[0\] is empty or inverted: \[40, 40, 10, 10\]"),
    ({"boxes": [[float("nan"), 1, 2, 3]]}, r"\.boxes\[0\] must be .*finite.*got \[nan, 1, 2, 3\]"),
    ({"box": [[1, 2, 3, 4]]}, r" has unknown fields \['box'\]"),
])
def test_bad_region_entries_name_the_file_the_image_and_the_field(tmp_path: Path, entry: object,
                                                                 message: str) -> None:
    (tmp_path / "bad.png").write_text("not an image")
    path = tmp_path / "regions.json"
    path.write_text(json.dumps({"images": {"a/b.png": entry}}))
    with pytest.raises(InvalidArgumentError, match=rf"regions\.json'?: images\['a/b\.png'\]{message}"):
        load_regions(path)


def test_bad_regions_are_refused_before_the_run(synthetic: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    (synthetic / "wrong.json").write_text(json.dumps({"images": {FIRST: {"boxes": [[10, 10, 40]]}}}))
    out = tmp_path / "ev"
    assert _evaluate(synthetic / "test", out, "--annotations", str(synthetic / "wrong.json"), "--metrics",
                     "pointing") == 2
    assert f"images[{FIRST!r}].boxes[0] must be [x0, y0, x1, y1]" in capsys.readouterr().err
    assert not out.exists()


def test_regions_must_fit_their_image(synthetic: Path, tmp_path: Path) -> None:
    """Wholly outside the 64 x 64 image: refused; partly outside: clipped; cropped away by the preprocessing: no
    region (left out), never a miss."""
    image = synthetic / FIRST
    path = synthetic / "fit.json"
    cases = {"boxes": [[500, 500, 600, 600]]}, {"keypoints": [[70, 2]]}, {"mask": "small.png"}
    Image.new("L", (8, 8), 255).save(synthetic / "small.png")
    for entry, message in zip(cases, (r"boxes\[0\] = \[500\.0, 500\.0, 600\.0, 600\.0\] lies wholly outside the image, "
                                      r"which is 64x64", r"keypoints\[0\] = \[70\.0, 2\.0\] lies outside the image",
                                      r"mask 'small\.png' is 8x8 pixels but its image is 64x64"), strict=True):
        path.write_text(json.dumps({"images": {FIRST: entry}}))
        with pytest.raises(InvalidArgumentError, match=rf"fit\.json'?: images\[{FIRST!r}\]\.{message}"):
            check_coverage(load_regions(path), [image], path)
    path.write_text(json.dumps({"images": {FIRST: {"boxes": [[-10, -10, 4, 2]]}}}))
    regions = load_regions(path)
    assert check_coverage(regions, [image], path) == ""
    none = torch.zeros(1, dtype=torch.long)
    masks, valid = regions.masks([ImageItem(image, 64, 64)], Preprocess("none"), (64, 64), none, none, None)
    assert valid.tolist() == [True] and masks[0].nonzero().max(0).values.tolist() == [1, 3]  # clipped to 4 x 2
    cropped = Preprocess("crop", crop=(32, 32))  # keeps the centre: the box is cropped away
    _, valid = regions.masks([ImageItem(image, 64, 64)], cropped, (32, 32), none, none, None)
    assert valid.tolist() == [False]


@pytest.mark.parametrize(("table", "line", "message"), [
    ("bounding_boxes.txt", "7 1 1 10 10", r"bounding_boxes\.txt' line 1: image id '7' is not in images\.txt"),
    ("bounding_boxes.txt", "1 1 x 10 10", r"bounding_boxes\.txt' line 1: y 'x' is not a finite number"),
    ("bounding_boxes.txt", "1 nan 1 10 10", r"bounding_boxes\.txt' line 1: x 'nan' is not a finite number"),
    ("bounding_boxes.txt", "1 1 1 0 10", r"line 1: the box of image id 1 has width 0\.0 .* must be > 0"),
    ("parts/part_locs.txt", "2 1 1 2 1", r"part_locs\.txt' line 1: image id '2' is not in images\.txt"),
    ("parts/part_locs.txt", "1 1 1 2 yes", r"part_locs\.txt' line 1: visible 'yes' is not a finite number"),
])
def test_bad_cub_lines_are_named(tmp_path: Path, table: str, line: str, message: str) -> None:
    (tmp_path / "parts").mkdir()
    (tmp_path / "images.txt").write_text("1 a/b.jpg\n")
    (tmp_path / table).write_text(line + "\n")
    with pytest.raises(InvalidArgumentError, match=message):
        load_regions(tmp_path, "box" if table.startswith("bounding") else "parts")


# 4. fills


def test_fills_must_be_finite_and_blurs_wide(synthetic: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    for option, message in ((["--fill", "nan"], "a pixel value in [0, 1]"), (["--fill", "inf"], "a pixel value"),
                            (["--fill=7"], "a pixel value in [0, 1]"), (["--fill=-3"], "a pixel value in [0, 1]"),
                            (["--fill", "blur", "--blur-sigma", "0"], "a finite number"),
                            (["--fill", "blur", "--blur-sigma", "-1"], "a finite number")):
        with pytest.raises(SystemExit):
            _evaluate(synthetic / "test", tmp_path / "ev", "--metrics", "rd", *option)
        assert message in capsys.readouterr().err, option
    assert _evaluate(synthetic / "test", tmp_path / "ev", "--metrics", "rd", "--blur-sigma", "2") == 2
    assert "--blur-sigma applies to --fill blur only, but --fill is 'mean'" in capsys.readouterr().err
    with pytest.raises(InvalidArgumentError, match="a fill value must be a finite number"):
        ScoreOptions(fill=float("nan"))
    with pytest.raises(InvalidArgumentError, match="blur_sigma must be a finite number of pixels > 0"):
        ScoreOptions(fill="blur", blur_sigma=0.0)
    with pytest.raises(InvalidArgumentError, match="blur_sigma must be a finite number of pixels > 0"):
        fill_images(torch.rand(1, 3, 4, 4), "blur", blur_sigma=-1.0)


# 5. resuming


def test_a_resume_may_change_the_batch_sizes(synthetic: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    options = ("--metrics", "rd", "deletion", "--steps", "4")
    assert _evaluate(synthetic / "test", tmp_path / "whole", *options, "--batch-size", "5") == 0
    out = tmp_path / "cut"
    assert _evaluate(synthetic / "test", out, *options, "--batch-size", "5") == 0
    lines = (out / PROGRESS).read_bytes().splitlines(keepends=True)
    (out / PROGRESS).write_bytes(b"".join(lines[:2]) + lines[2][:37])  # 10 images done, the third batch cut short
    assert _evaluate(synthetic / "test", out, *options, "--batch-size", "8", "--score-batch-size", "8") == 0
    records = [json.loads(line) for line in (out / PROGRESS).read_text().splitlines()]
    assert [len(r["indices"]) for r in records] == [5, 5, 8, 6]  # the 14 images left, in batches of the new size
    whole = _strict((tmp_path / "whole" / "results.json").read_text())
    resumed = _strict((out / "results.json").read_text())
    assert resumed["rows"] == whole["rows"] and resumed["curves"] == whole["curves"]
    capsys.readouterr()
    assert _evaluate(synthetic / "test", out, *options, "--fill", "zero", "--steps", "5") == 2
    error = capsys.readouterr().err
    assert "holds a finished evaluation (24 of 24 images done) with other options" in error
    assert "score.fill: was 'mean', now 'zero'" in error and "score.steps: was 4, now 5" in error
    assert _evaluate(synthetic / "test", out, *options, "--limit", "5") == 2  # counts of the evaluation held
    error = capsys.readouterr().err
    assert "holds a finished evaluation (24 of 24 images done)" in error and "images: was 24, now 5" in error
    (out / PROGRESS).write_bytes(b"".join(lines[:2]))
    assert _evaluate(synthetic / "test", out, *options, "--fill", "zero") == 2
    assert "holds a partial evaluation (10 of 24 images done)" in capsys.readouterr().err


# 6. - 8. output folder, data, references


def test_out_must_be_a_folder(synthetic: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "o1.png").write_bytes(b"")
    for out, message in ((tmp_path / "o1.png" / "st", "is a file, so"), (tmp_path / "o1.png", "is a file; give a")):
        with pytest.raises(SystemExit):
            _evaluate(synthetic / "test", out, "--metrics", "rd")
        assert f"argument --out: '{tmp_path / 'o1.png'}' {message}" in capsys.readouterr().err


def test_data_must_be_an_image_folder(synthetic: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    listing = tmp_path / "list.txt"
    listing.write_text(f"{synthetic / FIRST}\n")
    assert _evaluate(listing, tmp_path / "ev", "--metrics", "rd") == 2
    assert (f"--data {str(listing)!r} is a file; finercam evaluate takes an ImageFolder folder"
            in capsys.readouterr().err)


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_weight_references_need_a_linear_head(synthetic: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    model = load_embedded("cnn").model.eval()
    torch.jit.trace(model, torch.rand(1, 3, 64, 64)).save(str(tmp_path / "m.pt"))
    code = main(["evaluate", "--model", f"torchscript:{tmp_path / 'm.pt'}", "--data", str(synthetic / "test"),
                 "--out", str(tmp_path / "ts"), "--references", "weights", "--metrics", "rd"])
    assert code == 2
    error = capsys.readouterr().err
    assert "--references weights needs a model whose last layer is a linear classifier" in error
    assert "use --references nearest or top" in error and "classifier_weights=" not in error
    assert _evaluate(synthetic / "test", tmp_path / "cnn", "--references", "weights", "--metrics", "rd") == 0


def test_the_results_folder_stays_outside_the_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    (data / "a").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(data / "a" / "x.png")
    for out, message in ((data / "eval", "is inside --data"), (data, "is inside --data"),
                         (tmp_path, "is inside --out")):
        assert main(["evaluate", "--model", "embedded:cnn", "--data", str(data), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert message in err and "the evaluation" in err, err
    assert not (data / "eval").exists()
