"""What ``finercam synth`` writes and replaces: the new dataset replaces the old one only once complete, a user's own
files are never deleted or overwritten, the preview stays small whatever the image size, and seeds are bounded."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

import finercam.synth.io as synth_io
from finercam.cli import main
from finercam.synth import SynthConfig, load_dataset, write_dataset
from finercam.synth.io import load_annotations
from finercam.synth.spec import SynthArgumentError

CONFIG = SynthConfig(image_size=32, species_per_genus=2)


def test_an_interrupted_overwrite_leaves_the_old_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_dataset(tmp_path, train=6, test=3, seed=1, config=CONFIG)
    before = sorted(str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*"))
    calls = []

    def interrupted(count: int, seed: int, config: SynthConfig) -> object:
        calls.append(count)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C while the test split is generated
        return generate(count, seed, config)

    generate = synth_io.generate
    monkeypatch.setattr(synth_io, "generate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_dataset(tmp_path, train=4, test=2, seed=2, config=CONFIG, overwrite=True)
    monkeypatch.undo()
    after = sorted(str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*")
                   if ".synth-partial" not in path.parts)
    assert after == before and load_annotations(tmp_path)["seed"] == 1 and len(load_dataset(tmp_path, "test")) == 3
    write_dataset(tmp_path, train=4, test=2, seed=2, config=CONFIG, overwrite=True)  # the partial folder is replaced
    assert load_annotations(tmp_path)["seed"] == 2 and len(load_dataset(tmp_path, "train")) == 4
    assert not (tmp_path / ".synth-partial").exists()


def test_a_users_files_are_never_deleted_or_overwritten(tmp_path: Path) -> None:
    (tmp_path / "train" / "cats").mkdir(parents=True)
    (tmp_path / "train" / "cats" / "tom.jpg").write_bytes(b"my photo")
    with pytest.raises(SynthArgumentError, match=r"already holds train \(without annotations.json: not a complete "
                                                 r"dataset\); pass overwrite=True"):
        write_dataset(tmp_path, train=2, test=0, config=CONFIG)
    with pytest.raises(SynthArgumentError, match=r"holds 'cats/tom.jpg', which finercam synth does not write, so "
                                                 "--overwrite does not delete it"):
        write_dataset(tmp_path, train=2, test=0, config=CONFIG, overwrite=True)
    assert (tmp_path / "train" / "cats" / "tom.jpg").read_bytes() == b"my photo"
    other = tmp_path / "other"
    other.mkdir()
    (other / "preview.png").write_bytes(b"my picture")
    assert main(["synth", "--out", str(other), "--train", "2", "--test", "0"]) == 2  # was replaced silently
    assert (other / "preview.png").read_bytes() == b"my picture"


def test_the_preview_stays_small_for_large_images(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["synth", "--out", str(tmp_path / "big"), "--train", "24", "--test", "0", "--size", "320"]) == 0
    capsys.readouterr()
    with Image.open(tmp_path / "big" / "preview.png") as preview:
        assert preview.size == (8 * 128, 12 * 128)  # 8 columns and 12 classes of 128 px, not 320 px each twice
        first = preview.crop((0, 0, 128, 128)).convert("RGB")
    records = [r for r in load_annotations(tmp_path / "big")["images"] if r["label"] == 0]
    with Image.open(tmp_path / "big" / records[0]["path"]) as image:
        expected = image.convert("RGB").resize((128, 128), Image.Resampling.BOX)
    assert first.tobytes() == expected.tobytes()  # the class's first image, shrunk


@pytest.mark.parametrize("seed", ["-1", "18446744073709551615", "99999999999999999999"])
def test_seeds_outside_64_bits_are_refused(tmp_path: Path, seed: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(["synth", "--out", str(tmp_path), "--train", "2", "--test", "0", "--seed", seed])
    assert stopped.value.code == 2
    assert f"argument --seed: must be a whole number from 0 to 9223372036854775807, got {seed}" in \
        capsys.readouterr().err
