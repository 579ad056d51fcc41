"""Values that would make a command run for hours or fail after its work: refused before any work, with the bound."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from cli_helpers import run_cli


def test_layers_bounds_the_tokens_of_an_attention_models_dry_run(capsys: pytest.CaptureFixture[str]) -> None:
    start = time.perf_counter()
    status, _, err = run_cli(["layers", "embedded:vit", "--size", "4096", "4096"], capsys)
    assert status == 2 and time.perf_counter() - start < 60  # was still running after 14 CPU-minutes
    assert ("--size 4096 4096 gives this attention model 262,144 tokens (512 x 512 patches of 8 x 8 px)" in err
            and "use at most about --size 1024 1024 (16,384 tokens)" in err), err
    status, out, _ = run_cli(["layers", "embedded:vit", "--size", "96", "128"], capsys)
    assert status == 0 and "the loader recommends: norm" in out
    status, out, _ = run_cli(["layers", "embedded:cnn", "--size", "2048", "2048"], capsys)  # no attention: any size
    assert status == 0 and "stage3" in out


def test_example_checks_its_output_folder_and_numbers_before_training(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "afile").write_text("mine")
    start = time.perf_counter()
    status, _, err = run_cli(["example", "--out", str(tmp_path / "afile")], capsys)
    assert status == 2 and "is a file; give a folder" in err and time.perf_counter() - start < 20  # trained first
    assert (tmp_path / "afile").read_text() == "mine"
    status, _, err = run_cli(["example", "--dilation", "100000000000000000000"], capsys)
    assert status == 2 and "argument --dilation: must be a whole number from 0 to 1000" in err


@pytest.mark.parametrize("command", [
    ["example"], ["demo"], ["evaluate", "--model", "embedded:cnn", "--data", "x"],
    ["train-probe", "--model", "embedded:cnn", "--data", "x", "--out", "h.safetensors"],
])
def test_seeds_are_bounded_everywhere(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = run_cli([*command, "--seed", "-1"], capsys)
    assert status == 2 and "argument --seed: must be a whole number from 0 to 9223372036854775807, got -1" in err, err
