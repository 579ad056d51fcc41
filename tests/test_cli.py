"""The ``explain``, ``layers`` and ``train-probe`` commands, end to end, with every loader kind."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import zoo
from cli_helpers import run_cli
from finercam.cli import main
from finercam.errors import InvalidArgumentError


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, list[str]]]:
    folder = tmp_path_factory.mktemp("zoo")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {kind: build(folder) for kind, build in zoo.BUILDERS.items()}


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return zoo.picture(tmp_path_factory.mktemp("images") / "bird.jpg")


@pytest.mark.parametrize("kind", sorted(zoo.BUILDERS))
def test_explain_with_every_loader_kind(
    kind: str, models: dict[str, tuple[str, list[str]]], image: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    spec, extra = models[kind]
    out = tmp_path / "explained.png"
    status, printed, errors = run_cli(["explain", str(image), "--model", spec, *extra, "--out", str(out)], capsys)
    assert status == 0, errors
    prediction = re.search(r"prediction: (?:.+ )?\(class (\d+), p=([0-9.]+)\)", printed)
    assert prediction is not None, printed
    references = re.findall(r"^  (?:.+ )?\(class (\d+), p=([0-9.]+)\)$", printed, flags=re.MULTILINE)
    assert 1 <= len(references) <= 3
    assert prediction.group(1) not in [index for index, _ in references]  # never its own reference
    probabilities = [float(prediction.group(2))] + [float(p) for _, p in references]
    assert all(0 <= p <= 1 for p in probabilities) and probabilities[0] == max(probabilities)
    with Image.open(out) as figure:
        assert figure.format == "PNG" and figure.width > 3 * figure.height / 2


def test_explain_names_and_targets(models: dict[str, tuple[str, list[str]]], image: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    spec, extra = models["hf"]
    argv = ["explain", str(image), "--model", spec, *extra, "--out", str(tmp_path / "a.png")]
    status, printed, _ = run_cli([*argv, "--target", "bee", "--references", "top", "--num-references", "1"], capsys)
    assert status == 0
    assert "explained:  bee (class 1" in printed or "prediction: bee (class 1" in printed
    status, _, errors = run_cli([*argv, "--target", "zebra"], capsys)
    assert status == 2 and "'zebra' is neither a class index nor a class name" in errors
    status, _, errors = run_cli([*argv, "--target", "7"], capsys)
    assert status == 2 and errors.startswith("finercam explain: --target 7 is not a class of hf:")
    assert errors.count("\n") == 1 and "give 0..2 or a class name" in errors


def test_explain_versus_contrasts_with_the_classes_given(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from finercam import FinerCAM
    from finercam.explain_image import explain_image
    from finercam.models import load_model
    from finercam.synth import generate

    picture = tmp_path / "bird.png"
    Image.fromarray((generate(1, seed=5).images[0].permute(1, 2, 0) * 255).to(torch.uint8).numpy()).save(picture)
    loaded = load_model("embedded:cnn")
    names = loaded.class_names
    assert names is not None
    argv = ["explain", str(picture), "--model", "embedded:cnn", "--out", str(tmp_path / "a.png"), "--gamma", "1"]
    status, printed, errors = run_cli([*argv, "--versus", "3", "--versus", names[5]], capsys)
    assert status == 0, errors
    listed = printed.split("references (given with --versus, gamma 1, mean):\n")[1].splitlines()[:2]
    assert [line.split("(class ")[1].split(",")[0] for line in listed] == ["3", "5"]  # in the order given

    pixels = loaded.preprocess(Image.open(picture).convert("RGB"))
    result = explain_image(loaded, pixels, gamma=1.0, versus=[3, 5]).result
    with FinerCAM(loaded.model, "stage3") as cam:  # Grad-CAM is linear in the gradient: raw(s) = raw(y_c) - mean_t
        plain = [cam(pixels[None], targets=k, gamma=0.0).raw_maps[0] for k in (int(result.targets[0]), 3, 5)]
    torch.testing.assert_close(result.raw_maps[0], plain[0] - (plain[1] + plain[2]) / 2, atol=1e-5, rtol=1e-4)
    predicted = int(result.targets[0])
    assert result.references[0].tolist() == [3, 5] and predicted not in (3, 5)

    for extra, message in (
        (["--versus", str(predicted)], f"--versus {names[predicted]!r} (class {predicted}) is the top prediction, "
                                       "explained by default: a class cannot be its own reference"),
        (["--target", "4", "--versus", "4"], f"--versus {names[4]!r} (class 4) is the class given with --target"),
        (["--versus", "3", "--versus", names[3]], f"--versus needs one or more different classes; {names[3]!r} "
                                                  "(class 3) is given twice"),
        (["--versus", "24"], "--versus 24 is not a class of embedded:cnn: give 0..23 or a class name"),
        (["--versus", "3", "--num-references", "2"], "--versus gives the reference classes themselves; "
                                                     "--num-references chooses them"),
    ):
        status, _, errors = run_cli([*argv, *extra], capsys)
        assert status == 2 and errors.startswith(f"finercam explain: {message}"), (extra, errors)
        assert errors.count("\n") == 1


def test_explain_bad_inputs_are_one_line_errors(
    image: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, _, errors = run_cli(["explain", str(tmp_path / "missing.jpg"), "--model", "timm:resnet18"], capsys)
    assert status == 2 and "does not exist" in errors
    not_an_image = tmp_path / "notes.jpg"
    not_an_image.write_text("hello")
    status, _, errors = run_cli(["explain", str(not_an_image), "--model", "python:nowhere.py:build"], capsys)
    assert status == 2 and "nowhere.py" in errors and "Traceback" not in errors
    status, _, errors = run_cli(["explain", str(image), "--model", "timm:resnet1888"], capsys)
    assert status == 2 and "resnet1888" in errors


def test_command_line_values_are_checked(
    models: dict[str, tuple[str, list[str]]], image: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec, extra = models["hf"]
    explain = ["explain", str(image), "--model", spec, *extra]
    for bad, expected in (("cuda", "CUDA device"), ("tpu:9", "not a device")):
        if bad == "cuda" and torch.cuda.is_available():
            continue
        status, _, errors = run_cli([*explain, "--device", bad], capsys)
        assert status == 2 and expected in errors and "Traceback" not in errors
    for argv in (["example", "--train-size", "0"], ["example", "--threads", "-1"], ["example", "--dilation", "-1"],
                 ["example", "--eval-size", "50", "--test-size", "8"], [*explain, "--gamma", "-1"],
                 [*explain, "--num-references", "0"]):
        with pytest.raises(SystemExit) as raised:
            main(argv)
        assert raised.value.code == 2, argv
    folder = tmp_path / "figures"
    folder.mkdir()
    status, printed, _ = run_cli([*explain, "--out", str(folder)], capsys)  # a directory: the figure goes inside
    assert status == 0 and (folder / "bird.finercam.png").is_file() and str(folder / "bird.finercam.png") in printed
    status, printed, _ = run_cli([*explain, "--out", str(tmp_path / "nosuffix")], capsys)
    assert status == 0 and (tmp_path / "nosuffix.png").is_file() and str(tmp_path / "nosuffix.png") in printed


def test_digit_class_names_are_not_mistaken_for_indices() -> None:
    from finercam.explain_image import parse_target

    names = ("001", "002", "003")
    assert parse_target("002", names) == 1
    assert parse_target("2", names) == 2
    with pytest.raises(InvalidArgumentError, match="both the name of class 0 and the index 1"):
        parse_target("1", ("1", "0"))


def test_layers_lists_candidates_and_marks_the_automatic_choice(
    models: dict[str, tuple[str, list[str]]], capsys: pytest.CaptureFixture[str]
) -> None:
    spec, extra = models["torchvision"]
    status, printed, _ = run_cli(["layers", spec, *extra], capsys)
    assert status == 0
    assert re.search(r"^ \* layer4 ", printed, flags=re.MULTILINE), printed
    spec, extra = models["timm"]
    status, printed, _ = run_cli(["layers", spec, *extra], capsys)
    assert status == 0
    assert re.search(r"^ \* blocks\.11\.norm1 ", printed, flags=re.MULTILINE), printed


def test_train_probe_beats_chance_caches_features_and_its_head_loads(
    tmp_path: Path, image: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import timm
    from safetensors.torch import save_file

    classes = zoo.shapes_dataset(tmp_path / "shapes")
    torch.manual_seed(26)
    save_file(timm.create_model("resnet18", pretrained=False).state_dict(), tmp_path / "backbone.safetensors")
    argv = ["train-probe", "--model", "timm:resnet18", "--weights", str(tmp_path / "backbone.safetensors"),
            "--data", str(tmp_path / "shapes"), "--out", str(tmp_path / "head.safetensors"),
            "--cache", str(tmp_path / "cache"), "--preprocess", "imagenet"]
    status, printed, errors = run_cli(argv, capsys)
    assert status == 0, errors
    accuracy = re.search(r"accuracy: train ([0-9.]+)%, val ([0-9.]+)%", printed)
    assert accuracy is not None, printed
    assert float(accuracy.group(2)) >= 80.0  # chance is 33 %: random-init features still separate the shapes
    assert "36 train / 18 val images" in printed
    status, printed, _ = run_cli(argv, capsys)
    assert status == 0 and "features from the cache" in printed
    status, printed, errors = run_cli(
        ["explain", str(image), "--model", "timm:resnet18", "--weights", str(tmp_path / "backbone.safetensors"),
         "--head", str(tmp_path / "head.safetensors"), "--out", str(tmp_path / "probe.png")], capsys,
    )
    assert status == 0, errors
    assert any(f"prediction: {name} (class" in printed for name in classes), printed
    from finercam.fingerprint import file_fingerprint
    from finercam.models import load_head

    recorded = load_head(tmp_path / "head.safetensors")[2]["backbone_weights_sha256"]
    assert recorded == file_fingerprint(tmp_path / "backbone.safetensors")["sha256"]


def test_explain_classes_explains_the_top_predictions_in_rows(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    from finercam import FinerCAM
    from finercam.explain_image import explain_top_classes
    from finercam.models import load_model
    from finercam.synth import generate

    picture = tmp_path / "bird.png"
    Image.fromarray((generate(1, seed=5).images[0].permute(1, 2, 0) * 255).to(torch.uint8).numpy()).save(picture)
    loaded = load_model("embedded:cnn")
    argv = ["explain", str(picture), "--model", "embedded:cnn", "--out", str(tmp_path / "top.png")]
    status, printed, errors = run_cli([*argv, "--classes", "3"], capsys)
    assert status == 0, errors
    pixels = loaded.preprocess(Image.open(picture).convert("RGB"))
    top = loaded.model(pixels[None]).topk(3).indices[0].tolist()
    explained = [int(m) for m in re.findall(r"explained: .*\(class (\d+),", printed)]
    assert explained == top and printed.count("references (nearest, gamma 0.6, mean):") == 3
    width, height = Image.open(tmp_path / "top.png").size
    assert height > width  # three rows of three panels (one row is three times wider than tall)
    rows = explain_top_classes(loaded, pixels, 3)
    with FinerCAM(loaded.model, "stage3") as cam:
        for k, row in enumerate(rows):
            torch.testing.assert_close(row.result.maps, cam(pixels[None], targets=top[k]).maps)
    # the maps beside the figure: the figure's pictures, the signed layer maps, the classes of each row
    maps = load_file(tmp_path / "top.safetensors")
    with safe_open(str(tmp_path / "top.safetensors"), framework="pt") as handle:
        metadata = handle.metadata()
    assert maps["targets"].tolist() == top and maps["finer_map"].shape == (3, 64, 64)
    for k, row in enumerate(rows):
        torch.testing.assert_close(maps["finer_map"][k], row.result.maps[0])  # 64 x 64 input: shown at its size
        torch.testing.assert_close(maps["base_map"][k], row.result.baseline_maps[0])
        torch.testing.assert_close(maps["finer_raw_map"][k], row.result.raw_maps[0])
        torch.testing.assert_close(maps["base_raw_map"][k], row.result.baseline_raw_maps[0])
        assert maps["references"][k].tolist() == [r.index for r in row.references]
        assert json.loads(metadata["rows"])[k]["target"]["name"] == loaded.class_names[top[k]]
    torch.testing.assert_close(maps["logits"], loaded.model(pixels[None])[0])
    assert metadata["model"] == "embedded:cnn" and metadata["layer"] == "stage3" and metadata["gamma"] == "0.6"
    assert "and " + str(tmp_path / "top.safetensors") in printed
    for extra, message in (
        (["--classes", "25"], "--classes 25 asks for the top 25 predictions, but embedded:cnn has 24 classes"),
        (["--classes", "2", "--target", "1"], "--classes explains the top predictions, each against its own "
                                              "references; --target names the one class to explain"),
        (["--classes", "2", "--versus", "1"], "--classes explains the top predictions, each against its own "
                                              "references; --versus gives the references of one explained class"),
    ):
        status, _, errors = run_cli([*argv, *extra], capsys)
        assert status == 2 and errors.startswith(f"finercam explain: {message}"), (extra, errors)
