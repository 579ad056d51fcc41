"""Edge cases of ``finercam run`` / ``visualize`` / ``report`` / ``export``: images 1 or 3 pixels wide, a renderer
that fails on one image, model files that change under a store, ``--out`` and ``--data`` nested, files given where
folders are expected (and the reverse), incomplete and empty stores, output paths under a file, ``--references
weights`` without a linear classifier, and the panel size bound.

The commands are parsed and dispatched by :mod:`finercam.dataset.command` alone (the sub-parsers it registers), so
these tests do not depend on the other commands of the ``finercam`` parser."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from finercam import viz
from finercam.dataset import RunSettings, StoreError, load_store, open_source, read_class_names, run_dataset
from finercam.dataset import export as export_module
from finercam.dataset import gallery as gallery_module
from finercam.dataset.export import export_official, export_overlays
from finercam.dataset.gallery import write_gallery
from finercam.dataset.store import chunk_files
from finercam.dataset.visualize import save_grids
from finercam.errors import InvalidArgumentError
from finercam.fingerprint import model_fingerprints
from run_data import (
    EMBEDDED_PREPROCESS,
    TINY_MODEL,
    cnn,
    dataset_cli,
    dataset_parser,
    synthetic_tree,
    tiny_model,
    tiny_run,
)

FAST = {"batch_size": 4, "chunk_size": 4, "num_workers": 0, "progress": False}
THIN = {"one.png": (1, 1), "w1.png": (1, 20), "w3.png": (3, 50), "h3.png": (50, 3)}
"""Images whose width or height is 1 or 3 pixels: (width, height)."""


def _parse_error(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> str:
    with pytest.raises(SystemExit) as exit_info:
        dataset_parser().parse_args([str(a) for a in argv])
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def _run(tree: Path, out: Path, **settings: object) -> None:
    source = open_source(tree, cnn().class_names)
    run_dataset(cnn().model, EMBEDDED_PREPROCESS, source, out, RunSettings(**{**FAST, **settings}))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def thin_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store of 6 synthetic birds and 4 images 1 or 3 pixels wide or high."""
    root = tmp_path_factory.mktemp("thin")
    tree = synthetic_tree(root / "data", 6)
    rng = np.random.default_rng(0)
    for name, (width, height) in THIN.items():
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tree / cnn().class_names[0] / name)
    _run(tree, root / "store")
    return root / "store"


# ---------------------------------------------------------------- 1. images 1 or 3 pixels wide


def test_overlay_takes_the_layout_from_the_caller_not_the_shape() -> None:
    matplotlib = viz._matplotlib()
    heat = torch.rand(50, 3)
    image = torch.rand(3, 50, 3)  # (C, H, W) of an image 3 pixels wide: its last axis looks like channels
    expected = 0.5 * image.permute(1, 2, 0).numpy() + 0.5 * matplotlib.colormaps["jet"](heat.numpy())[..., :3]
    np.testing.assert_allclose(viz.overlay(image, heat), expected, atol=1e-6)
    np.testing.assert_allclose(viz.overlay(image, heat, channels="first"), expected, atol=1e-6)
    # the same pixels channel-last, as numpy and Pillow keep them
    np.testing.assert_allclose(viz.overlay(image.permute(1, 2, 0).numpy(), heat), expected, atol=1e-6)
    one = torch.tensor([0.2, 0.4, 0.6])[:, None, None]  # a 1 x 1 image
    np.testing.assert_allclose(viz.overlay(one, torch.ones(1, 1), alpha=0.0), [[[0.2, 0.4, 0.6]]], atol=1e-6)
    with pytest.raises(InvalidArgumentError, match=r"expected an image \(C, H, W\) with C = 1 or 3"):
        viz.overlay(torch.rand(50, 3, 3), heat, channels="first")
    with pytest.raises(InvalidArgumentError, match="channels must be 'first'"):
        viz.overlay(image, heat, channels="middle")  # type: ignore[arg-type]


def test_every_view_draws_images_one_or_three_pixels_wide(thin_store: Path, tmp_path: Path) -> None:
    store = load_store(thin_store)
    assert len(store) == 6 + len(THIN)
    path, left_out = write_gallery(store, tmp_path / "g.html", limit=None)
    assert left_out == [] and path.read_text().count('class="card"') == len(store)
    grids, skipped = save_grids(store, tmp_path / "grids")
    assert skipped == [] and len(grids) == len(store)
    report = export_overlays(store, tmp_path / "png")
    assert report.skipped == [] and len(report.written) == len(store)
    sizes = {path.name.split("-")[0]: Image.open(path).size for path in report.written}
    for name, size in THIN.items():
        assert sizes[Path(name).stem] == size  # the overlay has the image's own size
    assert len(export_official(store, tmp_path / "npy").written) == len(store)


def test_a_renderer_failing_on_one_image_leaves_only_that_one_out(
    thin_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = load_store(thin_store)
    bad = store.ok_records()[2]
    real = export_module.render_map

    def render_map(store_, row, gamma, size=None):  # type: ignore[no-untyped-def]
        if row == bad.row:
            raise RuntimeError("boom")
        return real(store_, row, gamma, size)

    for module in (export_module, gallery_module):
        monkeypatch.setattr(module, "render_map", render_map)
    monkeypatch.setattr("finercam.dataset.visualize.render_map", render_map)
    reason = "could not be rendered (RuntimeError: boom)"
    report = export_overlays(store, tmp_path / "png")
    assert report.skipped == [(bad.id, reason)] and len(report.written) == len(store) - 1
    official = export_official(store, tmp_path / "npy")
    assert official.skipped == [(bad.id, reason)] and len(official.written) == len(store) - 1
    grids, skipped = save_grids(store, tmp_path / "grids")
    assert skipped == [(bad.id, reason)] and len(grids) == len(store) - 1
    path, left_out = write_gallery(store, tmp_path / "g.html", limit=None)
    page = path.read_text()
    assert left_out == [(bad.id, reason)] and page.count('class="card"') == len(store) - 1
    assert "Left out of this gallery (1)" in page and "RuntimeError: boom" in page


# ---------------------------------------------------------------- 2. model files that change under a store

def test_resume_refuses_changed_weights_and_reads_older_stores(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, weights, data = tiny_model(tmp_path / "m")
    out = tmp_path / "store"
    assert tiny_run(model, weights, data, out) == 0
    manifest = json.loads((out / "store.json").read_text())
    recorded = manifest["config"]["model"]["fingerprints"]
    content = weights.read_bytes()
    assert recorded["weights"] == {"size": len(content), "sha256": hashlib.sha256(content).hexdigest()}
    assert recorded["model"]["sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    chunk_files(out)[1].unlink()  # a run to resume
    state = {k: (v * 1.5).contiguous() for k, v in load_file(weights).items()}
    save_file(state, weights)  # same path, same size, other weights
    with pytest.raises(StoreError, match=r"config\.model\.fingerprints\.weights: the weights file changed since the "
                       r"store was made \(size (\d+) -> \1 bytes, sha256 [0-9a-f]{12}\.\.\. -> [0-9a-f]{12}\.\.\.\)"):
        tiny_run(model, weights, data, out)
    assert 1 not in chunk_files(out)  # nothing was mixed in
    # a store made before fingerprints were recorded: still readable, and resumed with a note
    del manifest["config"]["model"]["fingerprints"]
    (out / "store.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert tiny_run(model, weights, data, out) == 0
    assert "the store predates model-file fingerprints" in capsys.readouterr().out
    assert dataset_cli("report", out, "--out", tmp_path / "g.html") == 0
    assert dataset_cli("visualize", out, "--out", tmp_path / "grids") == 0
    assert dataset_cli("export", out, "--out", tmp_path / "png") == 0
    assert len(list((tmp_path / "png").rglob("*.png"))) == 6


# ---------------------------------------------------------------- 3.-5. --data, --out and --class-names


def test_resume_refuses_a_changed_hf_folder_and_reads_stores_that_predate_its_fingerprints(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tf = pytest.importorskip("transformers")
    torch.manual_seed(8)
    config = tf.ViTConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                          image_size=16, patch_size=8, num_labels=3)
    vit = tf.ViTForImageClassification(config).eval()
    folder = tmp_path / "vit"
    vit.save_pretrained(folder)
    _, _, data = tiny_model(tmp_path / "m")
    out = tmp_path / "store"

    def run() -> int:
        return dataset_cli("run", "--model", f"hf:{folder}", "--data", data, "--out", out, "--preprocess", "none@16",
                           "--chunk-size", "4", "--batch-size", "4", "--workers", "0", "--quiet")

    assert run() == 0
    manifest = json.loads((out / "store.json").read_text())
    recorded = manifest["config"]["model"]["fingerprints"]
    assert sorted(recorded) == ["hf:config.json", "hf:model.safetensors"]
    assert recorded["hf:model.safetensors"]["sha256"] == hashlib.sha256(
        (folder / "model.safetensors").read_bytes()).hexdigest()
    chunk_files(out)[1].unlink()  # a run to resume
    with torch.no_grad():
        vit.classifier.weight.mul_(-1.0)  # fine-tuned again and saved to the same folder
    vit.save_pretrained(folder)
    with pytest.raises(StoreError, match=r"config\.model\.fingerprints\.hf:model\.safetensors: the "
                       r"hf:model\.safetensors file changed since the store was made"):
        run()
    assert 1 not in chunk_files(out)  # nothing was mixed in
    # a store made before hf: folders were fingerprinted: resumed, with a note naming the files it cannot check
    manifest["config"]["model"]["fingerprints"] = {}
    (out / "store.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert run() == 0
    note = capsys.readouterr().out
    assert "the store predates model-file fingerprints" in note and "hf:config.json, hf:model.safetensors" in note
    # a store that records the folder's files refuses a weights file added to it
    manifest["config"]["model"]["fingerprints"] = model_fingerprints(f"hf:{folder}")
    (out / "store.json").write_text(json.dumps(manifest))
    (folder / "pytorch_model.bin").write_bytes(b"other weights")
    chunk_files(out)[1].unlink()
    with pytest.raises(StoreError, match=r"fingerprints\.hf:pytorch_model\.bin: store no file, now a file"):
        run()


def test_out_and_data_must_not_nest(tmp_path: Path) -> None:
    tree = synthetic_tree(tmp_path / "data", 4)
    for out, message in (
        (tree, f"--out '{tree}' is inside --data '{tree}'"),
        (tree / "store", f"--out '{tree / 'store'}' is inside --data '{tree}'"),
        (tmp_path, f"--data '{tree}' is inside --out '{tmp_path}'"),
    ):
        with pytest.raises(InvalidArgumentError, match=f"^{re.escape(message)}"):
            dataset_cli("run", "--model", "embedded:cnn", "--data", tree, "--out", out, "--quiet")
        with pytest.raises(InvalidArgumentError, match=f"^{re.escape(message)}"):
            _run(tree, out)
    assert not (tree / "store").exists() and not (tree / "store.json").exists()
    assert not (tmp_path / "store.json").exists()


def test_data_and_class_names_of_the_wrong_kind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (1, 1)).save("one.png")
    Image.new("RGB", (4, 4)).save("picture", format="PNG")  # an image without a suffix
    Path("binary.lst").write_bytes(bytes(range(256)))
    Path("latin1.lst").write_bytes("café.png\n".encode("latin-1"))
    Path("names").mkdir()
    expected = {
        "one.png": "--data 'one.png' is an image, not an ImageFolder folder or a list file (one path per line)",
        "picture": "--data 'picture' is an image, not an ImageFolder folder or a list file",
        "binary.lst": "--data 'binary.lst' is a binary file (it holds NUL bytes), not an ImageFolder folder or a "
                      "list file",
        "latin1.lst": "--data 'latin1.lst' is not UTF-8 text (byte 0xe9 on line 1)",
        "missing.txt": "--data 'missing.txt' does not exist",
    }
    for data, message in expected.items():
        with pytest.raises(InvalidArgumentError, match=f"^{re.escape(message)}"):
            open_source(data)
        with pytest.raises(InvalidArgumentError, match=f"^{re.escape(message)}"):  # before the model is loaded
            dataset_cli("run", "--model", "embedded:nothing-loaded", "--data", data, "--out", "store")
    with pytest.raises(InvalidArgumentError, match=r"^class-names file 'names' is a folder; give a file"):
        read_class_names("names")
    with pytest.raises(InvalidArgumentError, match=r"^class-names file 'one\.png' is an image"):
        read_class_names("one.png")
    with pytest.raises(InvalidArgumentError, match=r"^class-names file 'latin1.lst' is not UTF-8 text"):
        read_class_names("latin1.lst")
    Path("d").mkdir()
    with pytest.raises(InvalidArgumentError, match=r"^class-names file 'names' is a folder"):
        dataset_cli("run", "--model", "embedded:nothing-loaded", "--data", "d", "--out", "store", "--class-names",
                    "names")
    assert not Path("store").exists()


# ---------------------------------------------------------------- 6. incomplete and empty stores


def test_incomplete_and_empty_stores_say_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tree = synthetic_tree(tmp_path / "data", 13)  # 4 chunks of 4
    _run(tree, tmp_path / "full")
    assert load_store(tmp_path / "full").coverage_note() is None
    _run(tree, tmp_path / "half", shard=(0, 2))
    half = load_store(tmp_path / "half")
    assert half.coverage_note() == (
        "the store is incomplete: 8 of the run's 13 images are present (2 of 4 chunks); missing: shard 1/2 (run it, "
        "or list its store folder too)"
    )
    _run(tree, tmp_path / "cut")
    for chunk in (2, 3):
        chunk_files(tmp_path / "cut")[chunk].unlink()
    capsys.readouterr()
    assert dataset_cli("report", tmp_path / "cut", "--out", tmp_path / "g.html") == 0
    printed = capsys.readouterr().out
    assert ("note: the store is incomplete: 8 of the run's 13 images are present (2 of 4 chunks); missing: chunks 2-3 "
            "(the run was interrupted or is still running: run the same command again to finish it)") in printed
    assert "incomplete store: 8 of the run's 13 images present" in printed
    assert "the store is incomplete: 8 of the run&#x27;s 13 images" in (tmp_path / "g.html").read_text()
    for view in (["visualize", tmp_path / "half", "--out", tmp_path / "grids"],
                 ["export", tmp_path / "half", "--out", tmp_path / "png"]):
        assert dataset_cli(*view) == 0
        assert "missing: shard 1/2" in capsys.readouterr().out
    for chunk in (0, 1):
        chunk_files(tmp_path / "cut")[chunk].unlink()  # only store.json is left
    for view in ("report", "visualize", "export"):
        out = tmp_path / ("e.html" if view == "report" else "e")
        with pytest.raises(StoreError, match=r"holds no images yet: its run lists 13 images, but no chunk of 4 has "
                           r"been written .* Run the same finercam run command again"):
            dataset_cli(view, tmp_path / "cut", "--out", out)
        assert not out.exists()


# ---------------------------------------------------------------- 7.-9. parse-time checks


def test_output_paths_under_a_file_fail_when_parsed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "o1.png"
    blocker.write_bytes(b"x")
    store = tmp_path / "store"
    for argv, message in (
        (["report", store, "--out", blocker / "x.html"], f"argument --out: '{blocker}' is a file, so"),
        (["report", store, "--out", tmp_path / "g.txt"], "must end in one of .html, .htm"),
        (["run", "--model", "embedded:cnn", "--data", tmp_path, "--out", blocker / "st"], f"'{blocker}' is a file"),
        (["export", store, "--out", blocker], f"argument --out: '{blocker}' is a file; give a folder"),
        (["visualize", store, "--out", blocker], f"argument --out: '{blocker}' is a file; give a folder"),
    ):
        assert message in _parse_error(capsys, *argv)


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_references_weights_needs_a_linear_classifier(tmp_path: Path) -> None:
    data = tiny_model(tmp_path / "m")[2]
    namespace: dict[str, object] = {}
    exec(TINY_MODEL, namespace)  # the test's own model
    scripted = torch.jit.trace(namespace["make"]().eval(), torch.rand(1, 3, 16, 16))  # type: ignore[operator]
    scripted.save(str(tmp_path / "m.pt"))
    with pytest.raises(InvalidArgumentError, match=r"^--references weights needs a model whose last layer is a linear "
                       r"classifier .* Use --references nearest or --references top$"):
        dataset_cli("run", "--model", f"torchscript:{tmp_path / 'm.pt'}", "--references", "weights", "--data", data,
                    "--out", tmp_path / "st", "--preprocess", "none", "--layer", "0", "--quiet")
    assert not (tmp_path / "st").exists()


def test_panel_size_is_bounded(thin_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    error = _parse_error(capsys, "visualize", thin_store, "--out", tmp_path / "v", "--panel", "100000")
    assert "argument --panel: must be a whole number of pixels from 16 to 4096, got 100000" in error
    with pytest.raises(InvalidArgumentError, match="panel must be a whole number of pixels from 16 to 4096"):
        save_grids(load_store(thin_store), tmp_path / "v", panel=100_000, limit=1)
    assert not (tmp_path / "v").exists()
