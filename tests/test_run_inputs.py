"""``finercam run`` inputs: every kind of bad file is explained correctly or skipped with its reason; listings,
labels and class names are matched strictly; class names from the data never escape a folder or the HTML."""

from __future__ import annotations

import html
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from finercam.dataset import ClassNameMismatchError, RunSettings, load_store, open_source, run_dataset
from finercam.dataset.decode import decode
from finercam.dataset.export import export_official, export_overlays
from finercam.dataset.gallery import write_gallery
from finercam.dataset.names import inside, safe_component
from finercam.dataset.sources import read_class_names
from finercam.dataset.visualize import save_grids
from finercam.errors import InvalidArgumentError
from run_data import EMBEDDED_PREPROCESS, cnn, synthetic_tree, write_bad_files

FAST = {"batch_size": 8, "chunk_size": 8, "num_workers": 0, "progress": False}


def test_decode_handles_every_awkward_kind(tmp_path: Path) -> None:
    expected = write_bad_files(tmp_path)
    for name, category in expected.items():
        decoded = decode(tmp_path / name, EMBEDDED_PREPROCESS, max_pixels=100_000)
        if category is None:
            assert decoded.reason is None, (name, decoded.reason)
            assert decoded.pixels is not None and decoded.pixels.shape == (3, 64, 64)
            assert decoded.pixels.dtype == torch.uint8  # normalised later, per batch, on the model's device
        else:
            assert decoded.pixels is None and decoded.reason is not None, name
            assert decoded.reason.startswith(category), (name, decoded.reason)
    for missing in (tmp_path / "no-such-file.png", tmp_path):  # a vanished file, a folder in a list file
        decoded = decode(missing, EMBEDDED_PREPROCESS)
        assert decoded.pixels is None and decoded.reason is not None
        assert decoded.reason.startswith("unreadable: "), decoded.reason


def test_decode_pixel_values(tmp_path: Path) -> None:
    """EXIF orientation is applied, 16-bit is scaled to 8-bit, 1 x 1 is upsampled: the content, not just shapes."""
    write_bad_files(tmp_path)
    raw = Image.open(tmp_path / "rotated.jpg")
    assert decode(tmp_path / "rotated.jpg", _no_preprocess()).image_size == (64, 48)  # rotated: height 64
    upright = np.asarray(ImageOps.exif_transpose(raw).convert("RGB"))
    decoded = decode(tmp_path / "rotated.jpg", _no_preprocess()).pixels
    assert decoded is not None
    np.testing.assert_array_equal(decoded.permute(1, 2, 0).numpy(), upright)
    gray16 = np.asarray(Image.open(tmp_path / "gray16.png"), dtype=np.float64)
    decoded16 = decode(tmp_path / "gray16.png", _no_preprocess()).pixels
    assert decoded16 is not None
    np.testing.assert_allclose(decoded16[0].double().numpy(), np.floor(gray16 / 256), atol=1)
    one = decode(tmp_path / "one_pixel.png", EMBEDDED_PREPROCESS).pixels
    assert one is not None
    torch.testing.assert_close(one, torch.tensor([200, 30, 30], dtype=torch.uint8)[:, None, None].expand(3, 64, 64))


def test_float_images_are_read_in_their_own_range(tmp_path: Path) -> None:
    """A 32-bit float TIFF in [0, 1] was clipped by Pillow's conversion to black and white; [0, 255] is kept; other
    ranges are refused, naming the range."""
    from finercam.images import ImageReadError, load_image

    values = np.random.default_rng(1).random((6, 5)).astype(np.float32)
    for name, pixels in (("unit", values), ("byte", values * 255)):
        Image.fromarray(pixels, mode="F").save(tmp_path / f"{name}.tif")
        decoded = decode(tmp_path / f"{name}.tif", _no_preprocess()).pixels
        assert decoded is not None
        np.testing.assert_allclose(decoded.double().numpy(), np.broadcast_to(values * 255, (3, 6, 5)), atol=1)
        np.testing.assert_allclose(np.asarray(load_image(tmp_path / f"{name}.tif"))[..., 0], values * 255, atol=1)
    wide = values * 1000 - 10
    Image.fromarray(wide, mode="F").save(tmp_path / "wide.tif")
    reason = decode(tmp_path / "wide.tif", _no_preprocess()).reason
    assert reason is not None and reason.startswith(f"unreadable: a 32-bit float image with values in [{wide.min():g}")
    with pytest.raises(ImageReadError, match=r"wide.tif.*reads float images in \[0, 1\] or \[0, 255\]"):
        load_image(tmp_path / "wide.tif")


def test_batch_normalisation_equals_per_image_preprocessing(tmp_path: Path) -> None:
    """``to_uint8`` + ``normalise`` of a batch gives bitwise what preprocessing each image alone gives."""
    from finercam.images import load_image
    from finercam.models.preprocess import PREPROCESS_PRESETS

    generator = np.random.default_rng(0)
    for k in range(3):
        Image.fromarray(generator.integers(0, 256, (40 + 7 * k, 50, 3), dtype=np.uint8)).save(tmp_path / f"{k}.png")
    for preprocess in (PREPROCESS_PRESETS["imagenet"], EMBEDDED_PREPROCESS, _no_preprocess()):
        images = [load_image(tmp_path / f"{k}.png") for k in range(3)]
        one_by_one = [preprocess(image) for image in images]
        if preprocess.fixed_size is None:
            continue
        batch = preprocess.normalise(torch.stack([decode(tmp_path / f"{k}.png", preprocess).pixels for k in range(3)]))
        assert batch.dtype == torch.float32
        assert torch.equal(batch, torch.stack(one_by_one)), preprocess.name
    with pytest.raises(TypeError, match="uint8"):
        EMBEDDED_PREPROCESS.normalise(torch.zeros(3, 4, 4))


def _no_preprocess():
    from finercam.models.preprocess import get_preprocess

    return get_preprocess("none")


def test_decompression_bomb_guard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Image.new("RGB", (120, 100)).save(tmp_path / "warn.png")  # 12,000 px: between the limit and twice it
    Image.new("RGB", (300, 100)).save(tmp_path / "bomb.png")  # 30,000 px: Pillow itself refuses
    Image.new("RGB", (90, 100)).save(tmp_path / "fine.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning may leak out
        for name in ("warn.png", "bomb.png"):
            decoded = decode(tmp_path / name, EMBEDDED_PREPROCESS)
            assert decoded.pixels is None and decoded.reason is not None and decoded.reason.startswith("too large")
        assert decode(tmp_path / "fine.png", EMBEDDED_PREPROCESS).reason is None
    # the preprocessed size is guarded too: a shorter-side resize of a thin strip would be enormous
    Image.new("RGB", (1, 50)).save(tmp_path / "strip.png")
    from finercam.models.preprocess import Preprocess

    assert decode(tmp_path / "strip.png", Preprocess(resize=256), max_pixels=100_000).reason.startswith("too large")


def test_run_goes_on_past_bad_files(tmp_path: Path) -> None:
    tree = synthetic_tree(tmp_path / "data", 12)
    first_class = cnn().class_names[0]
    expected = write_bad_files(tree / first_class)
    source = open_source(tree, cnn().class_names)
    summary = run_dataset(
        cnn().model, EMBEDDED_PREPROCESS, source, tmp_path / "store", RunSettings(**FAST, max_pixels=100_000)
    )
    store = load_store(tmp_path / "store")
    by_name = {Path(record.id).name: record for record in store.records}
    for name, category in expected.items():
        record = by_name[name]
        if category is None:
            assert record.status == "ok", (name, record.reason)
        else:
            assert record.status == "skipped" and record.reason.startswith(category), (name, record.reason)
    skipped = sum(category is not None for category in expected.values())
    assert summary.skipped == skipped and summary.explained == 12 + len(expected) - skipped
    assert {reason for reason in summary.skip_reasons} == {c for c in expected.values() if c}
    rotated = by_name["rotated.jpg"].row
    assert store.image_sizes[rotated].tolist() == [64, 48]  # EXIF rotation applied before anything else
    saved = json.loads((tmp_path / "store" / "summary.json").read_text())
    assert len(saved["skipped_files"]) == skipped


def test_class_names_must_match(tmp_path: Path) -> None:
    names = cnn().class_names
    tree = tmp_path / "data"
    for folder in (names[0], names[1].upper().replace("-", " "), "zz-unknown-bird", "03-finch-blak_beak-white_wingbar"):
        (tree / folder).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tree / folder / "a.png")
    with pytest.raises(ClassNameMismatchError) as caught:
        open_source(tree, names)
    message = str(caught.value)
    assert "2 class name(s)" in message and "'zz-unknown-bird'" in message
    assert "03-finch-black_beak-white_wingbar" in message  # the closest match is offered
    (tree / "zz-unknown-bird" / "a.png").unlink()
    (tree / "zz-unknown-bird").rmdir()
    (tree / "03-finch-blak_beak-white_wingbar" / "a.png").rename(tree / "03-finch-blak_beak-white_wingbar" / "b.png")
    (tree / "03-finch-blak_beak-white_wingbar").rename(tree / names[3])
    source = open_source(tree, names)  # an upper-cased, space-separated folder matches after normalising, said so
    assert source.label_source == "normalised-class-names" and source.notes
    assert sorted({item.label for item in source.items}) == [0, 1, 3]
    (tree / names[3] / "b.png").rename(tree / "loose.png")  # an image beside the class folders is said, not lost
    notes = " ".join(open_source(tree, names).notes)
    assert "1 image file(s) at the top of the tree (e.g. 'loose.png') are in no class folder" in notes
    (tree / "__MACOSX" / "thumbs").mkdir(parents=True)  # a folder without images is no class to match: said, not fatal
    source = open_source(tree, names)
    assert f"2 folder(s) of {str(tree.resolve())!r} hold no image and are left out: '{names[3]}', '__MACOSX'" in (
        " ".join(source.notes))  # the folder emptied above, and this one
    assert sorted({item.label for item in source.items}) == [0, 1]


def test_no_class_names_uses_folder_order_and_says_so(tmp_path: Path) -> None:
    tree = synthetic_tree(tmp_path / "data", 2 * len(cnn().class_names))  # every class has a folder
    source = open_source(tree, None)
    assert source.label_source == "folder-order" and "sorted folder name" in source.notes[0]
    assert [item.label for item in source.items] == [cnn().class_names.index(Path(i.id).parts[0]) for i in source.items]


def test_class_count_must_fit_the_model(tmp_path: Path) -> None:
    tree = synthetic_tree(tmp_path / "data", 12)
    (tmp_path / "names.txt").write_text("\n".join([*cnn().class_names, "extra"]) + "\n")
    source = open_source(tree, read_class_names(tmp_path / "names.txt"))
    classes = len(cnn().class_names)
    with pytest.raises(InvalidArgumentError, match=f"{classes} classes but {classes + 1} class names"):
        run_dataset(cnn().model, EMBEDDED_PREPROCESS, source, tmp_path / "store", RunSettings(**FAST))
    assert not (tmp_path / "store" / "store.json").exists()  # nothing a corrected run would refuse to resume
    fixed = open_source(tree, cnn().class_names)
    assert run_dataset(cnn().model, EMBEDDED_PREPROCESS, fixed, tmp_path / "store", RunSettings(**FAST)).explained == 12


def test_list_file_labels(tmp_path: Path) -> None:
    tree = synthetic_tree(tmp_path / "data", 12)
    names = cnn().class_names
    items = open_source(tree, names).items
    lines = ["# a comment", "", f"{items[0].path}\t{names[items[0].label]}", f"{items[1].path} {items[1].label}"]
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    source = open_source(tmp_path / "list.txt", names)
    assert [item.label for item in source.items] == [items[0].label, items[1].label] and source.has_labels
    (tmp_path / "bad.txt").write_text(f"{items[0].path}\tno such bird\n")
    with pytest.raises(ClassNameMismatchError, match="no such bird"):
        open_source(tmp_path / "bad.txt", names)
    (tmp_path / "unlabelled.txt").write_text(f"{items[0].path}\n")
    unlabelled = open_source(tmp_path / "unlabelled.txt", names)
    with pytest.raises(InvalidArgumentError, match="needs a ground-truth class"):
        run_dataset(cnn().model, EMBEDDED_PREPROCESS, unlabelled, tmp_path / "s", RunSettings(**FAST, target="label"))
    summary = run_dataset(cnn().model, EMBEDDED_PREPROCESS, unlabelled, tmp_path / "s2", RunSettings(**FAST))
    assert summary.explained == 1 and "explained class c: prediction" in summary.notes
    assert summary.accuracy is None


def test_safe_names() -> None:
    for text in ("../../etc/passwd", "a/b\\c", "..", "<script>alert(1)</script>", "", "\x00", "."):
        name = safe_component(text)
        assert name and "/" not in name and "\\" not in name and not name.startswith(".") and "<" not in name
    with pytest.raises(InvalidArgumentError, match="outside"):
        inside(Path("/tmp/out"), "..", "x")


EVIL = ("../../escaped", "<img src=x onerror=alert(1)>", "a/b\\c</script><script>alert(2)</script>")


def test_malicious_class_names_stay_inside(tmp_path: Path) -> None:
    """Class names and ids with path separators or markup: every output stays in its folder, the HTML is inert."""
    tree = synthetic_tree(tmp_path / "data", 12)
    names = list(cnn().class_names)
    names[:3] = EVIL
    (tmp_path / "names.txt").write_text("\n".join(names) + "\n")
    evil_folder = tmp_path / "data" / "<b onclick=alert(3)>bold & 'quotes'"
    evil_folder.mkdir()
    items = open_source(tree, cnn().class_names).items
    lines = [f"{item.path}\t{names[item.label]}" for item in items[:6]]
    Image.open(items[0].path).save(evil_folder / "<svg onload=alert(4)>.png")
    lines.append(f"{evil_folder / '<svg onload=alert(4)>.png'}\t{EVIL[1]}")
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    source = open_source(tmp_path / "list.txt", read_class_names(tmp_path / "names.txt"))
    run_dataset(cnn().model, EMBEDDED_PREPROCESS, source, tmp_path / "out" / "store", RunSettings(**FAST))
    store = load_store(tmp_path / "out" / "store")
    assert len(store) == 7
    export_overlays(store, tmp_path / "out" / "png", 1.0)
    export_official(store, tmp_path / "out" / "npy")
    save_grids(store, tmp_path / "out" / "grids")
    page, _ = write_gallery(store, tmp_path / "out" / "gallery.html")
    outside = [p for p in tmp_path.rglob("*") if p.is_file() and not (
        p.is_relative_to(tmp_path / "out") or p.is_relative_to(tmp_path / "data") or p.parent == tmp_path
    )]
    assert outside == []
    for kind in ("png", "npy", "grids"):
        for path in (tmp_path / "out" / kind).rglob("*"):
            assert path.resolve().is_relative_to((tmp_path / "out" / kind).resolve())
            assert "<" not in path.name and ">" not in path.name
    text = page.read_text()
    for evil in (*EVIL[1:], "<b onclick=alert(3)>", "<svg onload=alert(4)>"):  # markup never raw
        assert evil not in text
    assert html.escape(EVIL[1]) in text and text.count("<script>") == 1  # only the page's own script


def test_the_command_checks_the_class_names_file_against_the_model_first(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from finercam.cli import main

    tree = synthetic_tree(tmp_path / "data", 4)
    (tmp_path / "two.txt").write_text("finch\njay\n")
    argv = ["run", "--model", "embedded:cnn", "--data", str(tree), "--out", str(tmp_path / "s"), "--quiet"]
    assert main([*argv, "--class-names", str(tmp_path / "two.txt")]) == 2
    classes = len(cnn().class_names)
    assert f"lists 2 names but the model has {classes} classes" in capsys.readouterr().err
    assert main([*argv, "--class-names", "/dev/null"]) == 2
    assert "'/dev/null' is not a regular file (a device or a pipe)" in capsys.readouterr().err
    own = list(cnn().class_names)
    (tmp_path / "rotated.txt").write_text("\n".join(own[1:] + own[:1]) + "\n")  # the model's names, shifted by one
    assert main([*argv, "--class-names", str(tmp_path / "rotated.txt")]) == 2
    assert f"puts the model's class {own[1]!r} at position 0, but the model has it at 1" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
    (tmp_path / "own.txt").write_text("\n".join(own) + "\n")  # the model's own order is accepted
    assert main([*argv, "--class-names", str(tmp_path / "own.txt")]) == 0



def test_an_output_folder_that_cannot_be_made_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from finercam.cli import main

    tree = synthetic_tree(tmp_path / "data", 4)
    argv = ["run", "--model", "embedded:cnn", "--data", str(tree), "--quiet", "--workers", "0"]
    assert main([*argv, "--out", "/proc/finercam-cannot-be-made"]) == 2  # /proc takes no new folders
    error = capsys.readouterr().err
    assert error.startswith("finercam run: No such file or directory: '/proc/finercam-cannot-be-made")
    assert "Traceback" not in error
    assert main([*argv, "--out", str(tmp_path / "s")]) == 0
    assert main(["report", str(tmp_path / "s"), "--out", "/proc/finercam-page.html"]) == 2
    assert capsys.readouterr().err.startswith("finercam report: ")
