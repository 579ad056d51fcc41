"""What ``finercam evaluate`` records and resumes: the ground truth it scored against, one writer per folder, names
that never merge two values, fills defined in pixel space, damaged records named, models scored in eval mode."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from finercam import synth
from finercam.cli import main
from finercam.embedded import load_embedded
from finercam.errors import InvalidArgumentError
from finercam.evaluation.resume import PROGRESS, PROGRESS_CONFIG, exclusive
from finercam.evaluation.runner import EvaluationOptions, evaluate_dataset
from finercam.evaluation.scoring import ScoreOptions, gamma_key, pixel_fill
from finercam.evaluation.summary import csv_text, markdown, summarize
from finercam.metrics import pointing_hits, rd_name
from finercam.models.preprocess import Preprocess

FAST = ("--resamples", "20", "--gammas", "0.6", "--steps", "2", "--batch-size", "4")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    synth.write_dataset(root, train=0, test=8, seed=8128, species_per_genus=8)
    return root


def _evaluate(data: Path, out: Path, *extra: str) -> int:
    return main(["evaluate", "--model", "embedded:cnn", "--data", str(data), "--out", str(out), *FAST, *extra])


def _boxes(root: Path, name: str, box: list[int], radius_points: bool = False) -> Path:
    entry = {"keypoints": [[box[0], box[1]]]} if radius_points else {"boxes": [box]}
    images = {p.relative_to(root).as_posix(): entry for p in sorted((root / "test").rglob("*.png"))}
    path = root / name
    path.write_text(json.dumps({"images": images}))
    return path


def test_a_resume_refuses_other_ground_truth(synthetic: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    first, second = _boxes(synthetic, "a.json", [0, 0, 32, 32]), _boxes(synthetic, "b.json", [32, 32, 64, 64])
    out = tmp_path / "ev"
    assert _evaluate(synthetic / "test", out, "--annotations", str(first), "--metrics", "energy") == 0
    lines = (out / PROGRESS).read_text().splitlines(keepends=True)
    (out / PROGRESS).write_text(lines[0])  # a partial evaluation: 4 of 8 images
    capsys.readouterr()
    assert _evaluate(synthetic / "test", out, "--annotations", str(second), "--metrics", "energy") == 2
    error = capsys.readouterr().err
    assert "holds a partial evaluation (4 of 8 images done) with other options or data: regions.sha256" in error
    source = json.loads((tmp_path / "ev" / "results.json").read_text())["regions_source"]
    assert source["kind"] == "box" and source["source"] == repr(str(first)) and len(source["sha256"]) == 16
    points = _boxes(synthetic, "p.json", [10, 10], radius_points=True)
    assert _evaluate(synthetic / "test", tmp_path / "kp", "--annotations", str(points), "--metrics", "energy",
                     "--keypoint-radius", "3") == 0
    assert _evaluate(synthetic / "test", tmp_path / "kp", "--annotations", str(points), "--metrics", "energy",
                     "--keypoint-radius", "12") == 2
    assert "regions.keypoint_radius: was 3.0, now 12.0" in capsys.readouterr().err
    assert _evaluate(synthetic / "test", out, "--annotations", str(first), "--metrics", "energy") == 0  # the same
    printed = capsys.readouterr().out
    assert f"note: resuming the evaluation in {str(out)!r}: 4 of 8 images already done" in printed



def test_a_resume_refuses_a_changed_weights_file_and_reads_older_folders(synthetic: Path, tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors.torch import load_file, save_file

    (tmp_path / "net.py").write_text("from finercam.embedded import load_embedded\n\n\n"
                                     "def make():\n    return load_embedded('cnn').model\n")
    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in load_embedded("cnn").model.state_dict().items()}, weights)
    out = tmp_path / "ev"

    def evaluate() -> int:
        return main(["evaluate", "--model", f"python:{tmp_path / 'net.py'}:make", "--weights", str(weights),
                     "--preprocess", "none@64", "--data", str(synthetic / "test"), "--out", str(out), *FAST,
                     "--metrics", "rd"])

    assert evaluate() == 0
    config = json.loads((out / PROGRESS_CONFIG).read_text())
    assert sorted(config["model"]["fingerprints"]) == ["model", "weights"]
    lines = (out / PROGRESS).read_text().splitlines(keepends=True)
    (out / PROGRESS).write_text(lines[0])  # a partial evaluation: 4 of 8 images
    original = load_file(weights)
    save_file({k: (v * 1.01 if k.endswith(".weight") else v).contiguous() for k, v in original.items()}, weights)
    capsys.readouterr()
    assert evaluate() == 2  # same path, same size, other weights: the 4 images left would be another model's
    error = capsys.readouterr().err  # the fingerprint is the only thing that tells
    assert "with other options or data: model.fingerprints.weights.sha256: was '" in error and "; " not in error
    assert (out / PROGRESS).read_text() == lines[0]
    save_file(original, weights)
    del config["model"]["fingerprints"]  # a folder written before fingerprints were recorded
    (out / PROGRESS_CONFIG).write_text(json.dumps(config))
    assert evaluate() == 0
    printed = capsys.readouterr().out
    assert "predates model-file fingerprints: it cannot be checked that the model, weights file(s)" in printed
    assert "resuming the evaluation" in printed and len((out / PROGRESS).read_text().splitlines()) == 2

def test_a_second_writer_is_refused_and_duplicates_are_never_summarised(synthetic: Path, tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ev"
    with exclusive(out):  # another evaluation is writing there
        assert _evaluate(synthetic / "test", out, "--metrics", "rd") == 2
    assert f"another finercam evaluate is writing to {str(out)!r}" in capsys.readouterr().err
    assert _evaluate(synthetic / "test", out, "--metrics", "rd") == 0  # the lock is released with the run
    assert _evaluate(synthetic / "test", out, "--metrics", "rd", "--steps", "7") == 0  # no curve: steps are moot
    assert _evaluate(synthetic / "test", out, "--metrics", "rd", "--ks", "0.2") == 2  # but RD's own options count
    assert "score.ks: was [0.05, 0.1], now [0.2]" in capsys.readouterr().err
    records = [json.loads(line) for line in (out / PROGRESS).read_text().splitlines()]
    with pytest.raises(InvalidArgumentError, match=r"hold 4 image\(s\) twice \(e\.g\. index 0\).*--restart"):
        summarize([*records, records[0]], ("gradcam",), (0.0, 0.6))


def test_names_never_merge_two_values(synthetic: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert [rd_name(k) for k in (0.05, 0.1, 0.025, 0.051)] == ["rd@0.05", "rd@0.10", "rd@0.025", "rd@0.051"]
    assert [gamma_key(g) for g in (0.0, 0.6, 1.0, 0.6000001)] == ["0", "0.6", "1", "0.6000001"]
    assert _evaluate(synthetic / "test", tmp_path / "ev", "--metrics", "rd", "--ks", "0.05", "0.051",
                     "--gammas", "0.6", "0.6000001") == 0
    result = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert [row["gamma"] for row in result["rows"]] == [0.0, 0.6, 0.6000001]
    finer = result["rows"][1]["metrics"]
    assert set(finer) == {"rd@0.05", "rd@0.051"} and finer["rd@0.05"]["mean"] != finer["rd@0.051"]["mean"]
    assert _evaluate(synthetic / "test", tmp_path / "twice", "--ks", "0.05", "0.05") == 2
    assert "--ks repeats [0.05]: give each RD fraction once" in capsys.readouterr().err
    with pytest.raises(InvalidArgumentError, match=r"ks repeats \[0\.1\]"):
        ScoreOptions(ks=(0.1, 0.1))


def test_zero_and_numbers_are_pixels_whatever_the_normalisation(synthetic: Path, tmp_path: Path) -> None:
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    assert pixel_fill("zero", mean, std) == pytest.approx(tuple(-m / s for m, s in zip(mean, std, strict=True)))
    assert pixel_fill(0.5, None, None) == (0.5, 0.5, 0.5) and pixel_fill("mean", mean, std) is None
    means = {}
    for fill in ("mean", "zero"):
        out = tmp_path / fill
        assert _evaluate(synthetic / "test", out, "--metrics", "rd", "--preprocess", "imagenet@64", "--fill",
                         fill) == 0
        means[fill] = json.loads((out / "results.json").read_text())["rows"][1]["metrics"]["rd@0.05"]["mean"]
    assert means["zero"] != means["mean"]  # black pixels, not the mean colour that zero is in normalised space


def test_damaged_progress_files_are_named(synthetic: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ev"
    assert _evaluate(synthetic / "test", out, "--metrics", "rd") == 0
    lines = (out / PROGRESS).read_text().splitlines(keepends=True)
    config = (out / PROGRESS_CONFIG).read_text()
    for damage, message in (
        (lambda: (out / PROGRESS).write_text('{"indices": [0, 1\n' + lines[1]), "line 1 is not JSON"),
        (lambda: (out / PROGRESS).write_text(lines[0] + '{"images": []}\n'), "line 2 is not a batch record"),
        (lambda: (out / PROGRESS_CONFIG).write_text("garbage"), "is not the JSON an evaluation writes"),
    ):
        damage()
        capsys.readouterr()
        assert _evaluate(synthetic / "test", out, "--metrics", "rd") == 2
        error = capsys.readouterr().err
        assert message in error and "pass --restart to discard it" in error and error.count("\n") == 1, error
        (out / PROGRESS).write_text("".join(lines))
        (out / PROGRESS_CONFIG).write_text(config)


def test_nothing_readable_is_an_error_and_options_without_their_subject_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "data" / "00-finch-yellow_beak-plain_wingbar-plain_crown"
    folder.mkdir(parents=True)
    (folder / "a.png").write_text("not an image")
    assert _evaluate(tmp_path / "data", tmp_path / "ev", "--metrics", "rd") == 2
    error = capsys.readouterr().err
    assert "no image could be evaluated: all 1 files" in error and "a.png" in error
    for option, value in (("--regions", "box"), ("--keypoint-radius", "3")):
        assert _evaluate(tmp_path / "data", tmp_path / "ev2", option, value) == 2
        assert f"{option} chooses among the regions of --annotations, which is not given" in capsys.readouterr().err
    assert _evaluate(tmp_path / "data", tmp_path / "ev2", "--tolerance", "3") == 2
    assert "--tolerance applies to the pointing game, which this evaluation does not compute" in (
        capsys.readouterr().err)


def test_a_flat_map_points_nowhere_and_empty_maps_are_reported() -> None:
    mask = torch.zeros(2, 6, 6, dtype=torch.bool)
    mask[:, 0, 0] = True
    maps = torch.zeros(2, 6, 6)
    maps[1, 0, 0] = 1.0
    assert pointing_hits(maps, mask, 0).tolist() == [False, True]  # no evidence is no peak, not the top-left pixel
    record = {"indices": [0, 1], "skipped": [], "curves": {},
              "images": [{"correct": True, "index": 0}, {"correct": True, "index": 1}],
              "values": {"gradcam": {"0": {"pointing": [1.0, 0.0], "empty": [0.0, 0.0]},
                                     "0.6": {"pointing": [1.0, 0.0], "empty": [0.0, 1.0]}}}}
    summary = summarize([record], ("gradcam",), (0.0, 0.6), resamples=20)
    assert "Empty maps (no positive evidence" in markdown(summary) and "Finer-Grad-CAM γ 0.6 50.0%" in markdown(summary)
    assert csv_text(summary).splitlines()[2].endswith(",0.500000")


def test_a_model_in_train_mode_is_scored_in_eval_mode(synthetic: Path, tmp_path: Path) -> None:
    embedded = load_embedded("cnn")
    paths = [(path, None) for path in sorted((synthetic / "test").rglob("*.png"))[:4]]
    options = EvaluationOptions(gammas=(0.6,), score=ScoreOptions(metrics=("rd", "deletion"), steps=2,
                                                                  fill_mean=(0.0, 0.0, 0.0)))
    reference = evaluate_dataset(embedded.model, Preprocess("none"), paths, tmp_path / "eval", options,
                                 progress=False)
    embedded.model.train()
    buffers = {name: value.clone() for name, value in embedded.model.named_buffers()}
    try:
        trained = evaluate_dataset(embedded.model, Preprocess("none"), paths, tmp_path / "train", options,
                                   progress=False)
        assert embedded.model.training  # left as found
        for name, value in embedded.model.named_buffers():
            assert torch.equal(value, buffers[name]), name  # BatchNorm statistics untouched
    finally:
        embedded.model.eval()
    assert trained[0]["values"] == reference[0]["values"]
