"""Bad command-line input is refused with one specific line before any long work (Ctrl-C: ``test_cli_signals.py``).

Covers ``explain``, ``layers``, ``train-probe``, ``concepts``, ``synth``, ``demo`` and the entry point itself.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import zoo
from cli_helpers import run_cli, subprocess_env
from finercam import cli
from finercam.cli import main


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return zoo.picture(tmp_path_factory.mktemp("images") / "bird.png", width=64, height=64)


# ------------------------------------------------------------------------------------------- checkpoint files


@pytest.mark.parametrize(
    ("content", "name"),
    [("this is text\n", "t.pth"), ("hello world", "h.pth"), ("garbage\n", "g.safetensors")],
)
@pytest.mark.parametrize("option", ["--weights", "--head", "layers"])
def test_text_files_are_not_checkpoints(content: str, name: str, option: str, image: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    file = tmp_path / name
    file.write_text(content)
    if option == "layers":
        argv = ["layers", "torchvision:resnet18", "--weights", str(file)]
    else:
        argv = ["explain", str(image), "--model", "torchvision:resnet18", option, str(file)]
    status, _, errors = run_cli(argv, capsys)
    what = "head file" if option == "--head" else "weights file"
    assert status == 2
    assert errors.endswith(f"{what} '{file}' is not a checkpoint (neither safetensors nor a torch.save file)\n")


# ------------------------------------------------------------------------------------------------ output paths


def test_output_paths_are_checked_while_parsing(image: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                ) -> None:
    a_file, a_folder = tmp_path / "o1.png", tmp_path / "folder"
    a_file.write_bytes(b"")
    a_folder.mkdir()
    cases = [
        (["explain", str(image), "--model", "embedded:cnn", "--out", "x.txt"],
         "argument --out: 'x.txt' is not a figure file: give a name ending in one of .png, .jpg"),
        (["concepts", str(image), "--concept", "white wingbar", "--versus", "bird", "--out", "x.txt"],
         "argument --out: 'x.txt' is not a figure file"),
        (["train-probe", "--model", "embedded:cnn", "--data", str(tmp_path), "--out", str(a_folder)],
         f"argument --out: '{a_folder}' is a folder; give a file name"),
        (["train-probe", "--model", "embedded:cnn", "--data", str(tmp_path), "--out", "head.pth"],
         "argument --out: 'head.pth' must end in one of .safetensors"),
        (["train-probe", "--model", "embedded:cnn", "--data", str(tmp_path), "--out", "h.safetensors",
          "--cache", str(a_file)], f"argument --cache: '{a_file}' is a file; give a folder"),
        (["demo", "--out", str(a_file)], f"argument --out: '{a_file}' is a file; give a folder"),
        (["synth", "--out", str(a_file)], f"argument --out: '{a_file}' is a file; give a folder"),
    ]
    for argv, message in cases:
        status, _, errors = run_cli(argv, capsys)
        assert status == 2 and message in errors, (argv, errors)


def test_explain_figure_goes_into_a_folder_named_with_a_slash(
    image: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    status, printed, errors = run_cli(["explain", str(image), "--model", "embedded:cnn", "--out", "figures/"], capsys)
    assert status == 0, errors
    assert (tmp_path / "figures" / "bird.finercam.png").is_file() and "wrote figures/bird.finercam.png" in printed


# ------------------------------------------------------------------------------------------------------ numbers


def test_numbers_are_bounded(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    probe = ["train-probe", "--model", "embedded:cnn", "--data", str(tmp_path), "--out", "h.safetensors"]
    cases = [
        ([*probe, "--weight-decay", "-1"], "argument --weight-decay: must be a finite number >= 0, got -1"),
        ([*probe, "--weight-decay", "nan"], "argument --weight-decay: must be a finite number, got nan"),
        (["synth", "--out", str(tmp_path / "s"), "--size", "100000"],
         "argument --size: must be a whole number from 32 to 1024, got 100000"),
        (["layers", "embedded:cnn", "--size", "100000", "100000"],
         "argument --size: must be a whole number from 1 to 4096, got 100000"),
    ]
    for argv, message in cases:
        status, _, errors = run_cli(argv, capsys)
        assert status == 2 and message in errors, (argv, errors)


def test_synth_refuses_a_split_larger_than_the_memory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from finercam.synth.command import check_memory
    from finercam.synth.spec import SynthArgumentError

    check_memory(100, 100, 64, available=2**30)
    with pytest.raises(SynthArgumentError, match=r"--test 1000 images of 64 px need about 0\.2 GiB of memory .* "
                                                 r"this machine has 0\.1 GiB"):
        check_memory(10, 1000, 64, available=2**30 // 10)
    status, _, errors = run_cli(["synth", "--out", str(tmp_path / "s"), "--train", "100000000"], capsys)
    assert status == 2 and "--train 100000000 images of 64 px need about" in errors
    assert not (tmp_path / "s").exists()


# ------------------------------------------------------------------------------------------------------- layers


def test_layers_reports_the_true_error_of_embedded_models(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                          ) -> None:
    weights = tmp_path / "any.pth"
    torch.save({"w": torch.zeros(1)}, weights)
    status, _, errors = run_cli(["layers", "embedded:cnn", "--weights", str(weights)], capsys)
    assert status == 2 and "'embedded:cnn' ships its own weights" in errors and "head" not in errors
    status, _, errors = run_cli(["layers", "embedded:clip"], capsys)
    assert status == 2 and "unknown embedded model 'clip'; available: cnn, vit" in errors


def test_layers_dry_runs_at_the_models_own_size(capsys: pytest.CaptureFixture[str]) -> None:
    status, printed, _ = run_cli(["layers", "embedded:cnn"], capsys)
    assert status == 0 and "dry run on a 64x64 input" in printed
    assert " * stage3  cnn-stage              1x64x16x16" in printed  # not the 56x56 maps of a 224 px input
    status, printed, _ = run_cli(["layers", "embedded:vit"], capsys)
    assert status == 0 and " * blocks.4.norm1  vit-block-norm1        1x65x96" in printed and "?" not in printed


def test_layers_size_errors_name_the_option(capsys: pytest.CaptureFixture[str]) -> None:
    status, _, errors = run_cli(["layers", "embedded:cnn", "--size", "1", "1"], capsys)
    assert status == 2 and "the dry run of embedded:cnn on a 1x1 input failed (RuntimeError: " in errors
    assert errors.rstrip().endswith("give the input size the model expects with --size H W")
    status, _, errors = run_cli(["layers", "torchvision:resnet18", "--size", "1", "1"], capsys)
    assert status == 2 and "no module emits a map larger than 1x1 on a 1x1 input. A larger --size H W" in errors
    assert "image_size=" not in errors and "target_layer=" not in errors


# ------------------------------------------------------------------------------------------------- train-probe


def _image_folder(root: Path, classes: tuple[str, ...], per_class: int) -> Path:
    """An ImageFolder tree of small random pictures."""
    for name in classes:
        (root / name).mkdir(parents=True)
        for index in range(per_class):
            zoo.picture(root / name / f"{index}.png", width=32, height=32, seed=index)
    return root


def test_train_probe_refuses_a_single_class_before_loading_the_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _image_folder(tmp_path / "one", ("a",), per_class=3)
    argv = ["train-probe", "--model", "timm:no_such_model", "--data", str(data), "--out",
            str(tmp_path / "h.safetensors"), "--cache", str(tmp_path / "cache")]
    status, _, errors = run_cli(argv, capsys)  # the unknown model is never reached: the data is checked first
    assert status == 2
    assert f"--data '{data}' has training images of 1 class ('a'); a classifier needs at least 2 classes" in errors
    assert not (tmp_path / "h.safetensors").exists()


def test_train_probe_says_a_list_file_is_not_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    listing = tmp_path / "list.txt"
    listing.write_text("a.png\n")
    status, _, errors = run_cli(["train-probe", "--model", "embedded:cnn", "--data", str(listing), "--out",
                              str(tmp_path / "h.safetensors"), "--cache", str(tmp_path / "c")], capsys)
    assert status == 2 and f"--data '{listing}' is a file; train-probe needs a folder" in errors


def test_train_probe_without_validation_images(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "net.py").write_text(
        "from torch import nn\n\n"
        "def build():\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())\n"
    )
    data = _image_folder(tmp_path / "data", ("a", "b"), per_class=1)  # one image per class: nothing to hold out
    status, printed, errors = run_cli(
        ["train-probe", "--model", f"python:{tmp_path / 'net.py'}:build", "--data", str(data), "--out",
         str(tmp_path / "h.safetensors"), "--cache", str(tmp_path / "cache")], capsys,
    )
    assert status == 0, errors
    assert "2 train / 0 val images" in printed and "val n/a (no images)" in printed
    assert (tmp_path / "h.safetensors").is_file()


def test_train_probe_on_an_embedded_classifier_says_why(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _image_folder(tmp_path / "data", ("a", "b"), per_class=2)
    status, _, errors = run_cli(["train-probe", "--model", "embedded:cnn", "--data", str(data), "--out",
                              str(tmp_path / "h.safetensors"), "--cache", str(tmp_path / "c")], capsys)
    assert status == 2 and "'embedded:cnn' is a finished classifier, not a feature backbone" in errors


# ---------------------------------------------------------------------------------------------------- concepts


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--weights", "any.pth"], "--weights is only used with open_clip: models; embedded:clip takes none (it ships "
                                   "its own weights): leave it out"),
        (["--tokenizer", "syn"], "--tokenizer is only used with hf: models; embedded:clip has its own tokenizer"),
    ],
)
def test_concepts_refuses_options_the_model_does_not_use(
    extra: list[str], message: str, image: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "c.png"
    status, _, errors = run_cli(["concepts", str(image), "--concept", "white wingbar", "--versus", "bird", *extra,
                              "--out", str(out)], capsys)
    assert status == 2 and message in errors and not out.exists()


def test_concepts_refuses_the_concept_with_a_full_stop_as_its_reference(
    image: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, _, errors = run_cli(["concepts", str(image), "--concept", "white wingbar", "--versus", "white wingbar.",
                              "--out", str(tmp_path / "c.png")], capsys)
    assert status == 2 and "the reference 'white wingbar.' is the concept itself" in errors


# ----------------------------------------------------------------------------------- errors phrased for the CLI


def _conv_classifier(folder: Path) -> str:
    """A TorchScript classifier without an ``nn.Linear`` (its head is a 1x1 convolution)."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 3, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    path = folder / "conv.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(model).save(str(path))
    return f"torchscript:{path}"


def test_references_weights_errors_name_the_options(image: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    spec = _conv_classifier(tmp_path)
    status, _, errors = run_cli(["explain", str(image), "--model", spec, "--references", "weights", "--layer", "0",
                              "--out", str(tmp_path / "x.png")], capsys)
    assert status == 2
    assert "--references weights needs a model whose last layer is a linear classifier" in errors
    assert "Use --references nearest or --references top" in errors and "classifier_weights" not in errors
    (tmp_path / "mid.py").write_text(
        "from torch import nn\n\n"
        "class Net(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.conv, self.proj, self.classes = nn.Conv2d(3, 8, 3), nn.Linear(8, 8), nn.Conv2d(8, 5, 1)\n\n"
        "    def forward(self, x):\n"
        "        y = self.proj(self.conv(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)\n"
        "        return self.classes(y).mean((2, 3))\n\n"
        "def build():\n"
        "    return Net()\n"
    )
    status, _, errors = run_cli(["explain", str(image), "--model", f"python:{tmp_path / 'mid.py'}:build", "--layer",
                              "conv", "--references", "weights", "--out", str(tmp_path / "y.png")], capsys)
    assert status == 2 and "has 8 rows, not one per class of the model's output: it is not the classifier" in errors
    assert "classifier_weights" not in errors


def test_a_mismatch_outside_the_classifier_gives_no_class_count_hint(
    image: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from finercam.compat import import_torchvision

    state = import_torchvision().models.mobilenet_v3_small(weights=None).state_dict()
    state["features.0.0.weight"] = torch.zeros(16, 3, 1, 1)
    torch.save(state, tmp_path / "bad.pth")
    status, _, errors = run_cli(["explain", str(image), "--model", "torchvision:mobilenet_v3_small", "--weights",
                              str(tmp_path / "bad.pth")], capsys)
    assert status == 2 and "features.0.0.weight: checkpoint (16, 3, 1, 1) vs model (16, 3, 3, 3)" in errors
    assert "num_classes" not in errors and "classes" not in errors


# --------------------------------------------------------------------------------------------------------- help


def test_help_documents_every_model_kind_and_option(capsys: pytest.CaptureFixture[str]) -> None:
    def help_of(command: str) -> str:
        with pytest.raises(SystemExit):
            main([command, "--help"])
        return " ".join(capsys.readouterr().out.split())

    assert "embedded:cnn / embedded:vit" in help_of("explain")
    layers = help_of("layers")
    assert f"--weights WEIGHTS {cli.WEIGHTS_HELP}" in " ".join(layers.split())
    assert "--head HEAD a linear head (from train-probe" in layers


def test_the_figure_never_overwrites_the_input_image(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    picture = zoo.picture(tmp_path / "b3.png", width=64, height=64)
    before = picture.read_bytes()
    for argv in (["explain", "b3.png", "--model", "embedded:cnn", "--out", "b3"],
                 ["explain", "b3.png", "--model", "embedded:cnn", "--out", str(picture)],
                 ["concepts", "b3.png", "--concept", "white wingbar", "--versus", "bird", "--out", "./b3.png"]):
        status, _, errors = run_cli(argv, capsys)
        assert status == 2 and "would write the figure over the input image 'b3.png'" in errors, (argv, errors)
    assert picture.read_bytes() == before


def test_a_model_that_refuses_the_input_size_is_one_line(image: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    factory = tmp_path / "fixed.py"
    factory.write_text(textwrap.dedent("""
        from torch import nn
        def cnn32():  # takes 32 x 32 inputs only; the python: preprocessing gives 224 x 224
            return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 32 * 32, 4))
    """))
    status, _, errors = run_cli(["explain", str(image), "--model", f"python:{factory}:cnn32",
                              "--out", str(tmp_path / "x.png")], capsys)
    assert status == 2, errors
    assert errors.startswith("finercam explain: the model's forward pass failed on images of shape (1, 3, 224, 224)")
    assert "Traceback" not in errors and errors.count("\n") == 1


def test_finercams_warnings_are_one_line(image: Path, tmp_path: Path) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "finercam", "explain", str(image), "--model", "torchvision:resnet18",
         "--out", str(tmp_path / "r.png")],
        capture_output=True, text=True, env=subprocess_env(), timeout=300, check=False,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    lines = completed.stderr.strip().splitlines()
    assert lines == ["finercam: warning: torchvision model 'resnet18' has random weights (no weights file given); "
                     "give --weights FILE or torchvision:resnet18@FILE to explain a trained model"], lines
    assert cli._one_line_warning("x", UserWarning, "/site/other/lib.py", 3).endswith("UserWarning: x\n")


def test_api_advice_is_given_in_command_line_terms(image: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = ["--out", str(tmp_path / "x.png")]
    status, _, errors = run_cli(["explain", str(image), "--model", "embedded:cnn", "--layer", "head", *out], capsys)
    assert status == 2 and errors.strip().endswith(
        "(no submodule 'head'). List the layers with: finercam layers embedded:cnn.")
    status, _, errors = run_cli(["explain", str(image), "--model", "embedded:cnn", "--layer", "fc", *out], capsys)
    assert status == 2 and "Pick a spatial layer (list them with: finercam layers embedded:cnn)." in errors
    assert "reshape=" not in errors and "named_modules" not in errors


def test_a_small_input_model_runs_with_a_preset_at_its_size(image: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    factory = tmp_path / "fixed.py"
    factory.write_text(textwrap.dedent("""
        from torch import nn
        def cnn32():
            return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 32 * 32, 4))
    """))
    status, printed, errors = run_cli(["explain", str(image), "--model", f"python:{factory}:cnn32", "--layer", "1",
                                    "--preprocess", "imagenet@32", "--out", str(tmp_path / "x.png")], capsys)
    assert status == 0, errors
    assert "input: (3, 32, 32)" in printed and (tmp_path / "x.png").is_file()


def test_explain_never_replaces_a_checkpoint_with_its_maps_and_says_when_a_map_is_blank(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    from finercam.embedded import load_embedded
    from finercam.synth import write_dataset

    monkeypatch.chdir(tmp_path)
    write_dataset(tmp_path / "synth", train=0, test=8, seed=8128, species_per_genus=8)
    (finch,) = (tmp_path / "synth" / "test").glob("00-finch-*/*.png")  # nothing of jay 23 is in it
    shutil.copy(finch, "bird.png")
    (tmp_path / "net.py").write_text("from finercam.embedded import load_embedded\n\n\n"
                                     "def make():\n    return load_embedded('cnn').model\n")
    state = load_embedded("cnn").model.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "w.safetensors")
    before = (tmp_path / "w.safetensors").read_bytes()
    model = ["--model", f"python:{tmp_path / 'net.py'}:make", "--weights", "w.safetensors", "--preprocess", "none@64"]
    status, _, errors = run_cli(["explain", "bird.png", *model, "--out", "w.png"], capsys)
    assert status == 2 and "the maps would go to 'w.safetensors', which exists and is not a maps file" in errors
    assert (tmp_path / "w.safetensors").read_bytes() == before and not (tmp_path / "w.png").exists()
    for _ in range(2):  # its own maps file is replaced by the next run
        status, printed, errors = run_cli(["explain", "bird.png", "--model", "embedded:cnn", "--out", "e.png",
                                           "--target", "23", "--versus", "0", "--gamma", "20"], capsys)
        assert status == 0, errors
    blank = load_file(tmp_path / "e.safetensors")["base_raw_map"]
    assert float(blank.max()) <= 0  # class 23's evidence is negative everywhere on this picture
    assert "the base CAM of 23-jay" in printed and "is negative everywhere: nothing in the image raises its score" \
        in printed


def test_names_too_long_for_the_file_system_are_one_line_and_safe_names_stay_short(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from finercam.dataset.names import safe_component

    long = safe_component("鳥" * 80)
    assert len(long.encode()) <= 100 and long != safe_component("鳥" * 79 + "鸟")  # a cut name keeps a hash
    assert safe_component("a" * 64) == "a" * 64 and safe_component("finch") == "finch"
    picture = zoo.picture(tmp_path / f"{'b' * 245}.png", width=64, height=64)
    status, _, errors = run_cli(["explain", str(picture), "--model", "embedded:cnn", "--out", f"{tmp_path}/"],
                                capsys)
    assert status == 2 and errors.startswith("finercam explain: File name too long: ") and errors.count("\n") == 1
