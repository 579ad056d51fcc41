"""The result store of ``finercam run``: exact contents, re-rendering at new gammas without the model, resuming,
sharding, few files, exports, and the command line."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from finercam import FinerCAM
from finercam.cli import main
from finercam.dataset import RunSettings, StoreError, load_store, open_source, run_dataset
from finercam.dataset.export import export_official
from finercam.dataset.gallery import margins
from finercam.dataset.render import finer_raw_map, render_baseline, render_map
from finercam.dataset.store import CHUNKS, chunk_files, num_chunks
from finercam.errors import InvalidArgumentError
from finercam.postprocess import normalize_maps
from run_data import EMBEDDED_PREPROCESS, assert_same_store, cnn, synthetic_tree

COUNT = 40
FAST = {"batch_size": 8, "chunk_size": 16, "num_workers": 0, "progress": False}


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic_tree(tmp_path_factory.mktemp("data"), COUNT, seed=11)


def _run(tree: Path, out: Path, log: Callable[[str], None] | None = None, **settings: object):
    options = {**FAST, **settings}
    source = open_source(tree, cnn().class_names)
    return run_dataset(cnn().model, EMBEDDED_PREPROCESS, source, out, RunSettings(**options),  # type: ignore[arg-type]
                       log=log)


def _first_batch(tree: Path, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    items = open_source(tree, cnn().class_names).items[:size]
    from finercam.images import load_image

    images = torch.stack([EMBEDDED_PREPROCESS(load_image(item.path)) for item in items])
    return images, torch.tensor([item.label for item in items])


@pytest.mark.parametrize(("method", "aggregation", "gammas"), [
    ("gradcam", "mean", (0.6,)), ("xgradcam", "softmax", (0.3, 1.0)), ("layercam", "mean", (0.6,)),
])
def test_store_holds_exactly_what_finercam_computes(
    tree: Path, tmp_path: Path, method: str, aggregation: str, gammas: tuple[float, ...]
) -> None:
    """Stored gammas are FinerCAM's maps bit for bit (same batch); a new gamma of a linear method is re-rendered
    from the store alone and equals FinerCAM at that gamma."""
    _run(tree, tmp_path / "s", method=method, aggregation=aggregation, gammas=gammas, batch_size=8)
    store = load_store(tmp_path / "s")
    images, labels = _first_batch(tree, 8)
    cam = FinerCAM(cnn().model, cnn().target_layer, method)
    new = 1.7
    sweep = cam.sweep(images, [*gammas, new], targets=labels, references="nearest", num_references=3,
                      aggregation=aggregation)
    assert torch.equal(store.logits[:8], sweep.logits) and torch.equal(store.targets[:8], labels)
    assert torch.equal(store.references[:8], sweep.references)
    for row in range(8):
        assert torch.equal(store.baseline_raw_map(row), sweep.layer_baseline_raw_maps[0][row])
        for g, gamma in enumerate(gammas):
            assert torch.equal(finer_raw_map(store, row, gamma), sweep.layer_raw_maps[0][g, row])
            assert torch.equal(render_map(store, row, gamma), sweep.maps[g, row])
        assert torch.equal(render_baseline(store, row), sweep.baseline_maps[row])
        if method == "layercam":
            with pytest.raises(StoreError, match="not linear"):
                finer_raw_map(store, row, new)
            continue
        expected = sweep.layer_raw_maps[0][len(gammas), row]
        scale = float(expected.abs().max())
        torch.testing.assert_close(finer_raw_map(store, row, new), expected, atol=1e-5 * scale, rtol=1e-5)
        torch.testing.assert_close(render_map(store, row, new), sweep.maps[len(gammas), row], atol=1e-4, rtol=0)


def test_store_round_trip_and_metadata(tree: Path, tmp_path: Path) -> None:
    summary = _run(tree, tmp_path / "s", gammas=(0.0, 0.6, 2.0))
    store = load_store(tmp_path / "s")
    assert len(store) == COUNT and store.missing_chunks == () and store.gammas == (0.0, 0.6, 2.0)
    assert [record.index for record in store.records] == list(range(COUNT))
    assert store.index.tolist() == list(range(COUNT)) and store.layers == (cnn().target_layer,)
    assert store.finer_raw_maps(5).shape == (3, 16, 16) and store.map_sizes.tolist() == [[16, 16]] * COUNT
    assert torch.equal(store.finer_raw_maps(5)[0], store.baseline_raw_map(5))  # gamma 0 is the baseline (mean)
    config = store.config
    assert config["method"] == "gradcam" and config["preprocess"]["resize"] == [64, 64]
    classes = len(cnn().class_names)
    assert store.manifest["model_outputs"] == {"layers": ["stage3"], "num_classes": classes, "num_references": 3}
    assert set(store.manifest["versions"]) >= {"finercam", "torch", "python"}
    assert store.class_names == cnn().class_names
    probabilities = store.reference_probabilities
    assert probabilities.shape == (COUNT, 3) and torch.all(probabilities <= store.probabilities.max(1).values[:, None])
    assert summary.accuracy == pytest.approx(float((store.predictions == store.labels).float().mean()))
    assert torch.all(margins(store) <= 1) and margins(store).shape == (COUNT,)


def test_few_files(tree: Path, tmp_path: Path) -> None:
    _run(tree, tmp_path / "s", chunk_size=16)
    files = sorted(p.relative_to(tmp_path / "s").as_posix() for p in (tmp_path / "s").rglob("*") if p.is_file())
    assert files == ["chunks/chunk-000000.safetensors", "chunks/chunk-000001.safetensors",
                     "chunks/chunk-000002.safetensors", "store.json", "summary.json"]
    assert num_chunks(100_000, RunSettings().chunk_size) + 2 <= 300  # 100,000 images: a few hundred files at most


def test_shards_union_equals_full_run(tree: Path, tmp_path: Path) -> None:
    _run(tree, tmp_path / "full")
    for index in range(3):
        _run(tree, tmp_path / f"part{index}", shard=(index, 3))
        _run(tree, tmp_path / "shared", shard=(index, 3))  # shards may also share one folder
    full = load_store(tmp_path / "full")
    assert load_store(tmp_path / "part0").missing_chunks == (1, 2)
    assert_same_store(load_store([tmp_path / f"part{index}" for index in range(3)]), full)
    assert_same_store(load_store(tmp_path / "shared"), full)
    with pytest.raises(StoreError, match="chunk 0 is in both"):
        load_store([tmp_path / "part0", tmp_path / "full"])


def test_a_shard_without_chunks_says_so(tree: Path, tmp_path: Path) -> None:
    lines: list[str] = []
    options = {**FAST, "shard": (3, 4)}  # 40 images in chunks of 16: 3 chunks, so shard 3 of 4 has none
    source = open_source(tree, cnn().class_names)
    summary = run_dataset(cnn().model, EMBEDDED_PREPROCESS, source, tmp_path / "s", RunSettings(**options),
                          log=lines.append)  # type: ignore[arg-type]
    assert summary.as_dict()["explained"] == 0
    assert any("shard 3 of 4 gets no chunk: the run has 3 chunk(s) of 16 images" in line for line in lines), lines


def test_resume_skips_done_chunks_and_cleans_temporaries(tree: Path, tmp_path: Path) -> None:
    _run(tree, tmp_path / "full")
    _run(tree, tmp_path / "s")
    chunk_files(tmp_path / "s")[1].unlink()
    stale = tmp_path / "s" / CHUNKS / ".tmp-chunk-000001-999-abcd.safetensors"
    stale.write_bytes(b"half a chunk")
    summary = _run(tree, tmp_path / "s")
    assert summary.already_done == COUNT - 16 and summary.processed == 16 and not stale.exists()
    assert_same_store(load_store(tmp_path / "s"), load_store(tmp_path / "full"))
    again = _run(tree, tmp_path / "s")
    assert again.processed == 0 and again.already_done == COUNT
    damaged = chunk_files(tmp_path / "s")[2]
    damaged.write_bytes(damaged.read_bytes()[:-100])  # cut short outside finercam (a partial copy)
    lines: list[str] = []
    summary = _run(tree, tmp_path / "s", log=lines.append)
    assert summary.processed == COUNT - 32 and summary.already_done == 32  # the damaged chunk, explained again
    assert any("incomplete metadata" in line and "'chunk-000002.safetensors.damaged'" in line for line in lines)
    assert (damaged.parent / "chunk-000002.safetensors.damaged").exists()  # kept, not deleted
    assert_same_store(load_store(tmp_path / "s"), load_store(tmp_path / "full"))


def test_the_same_shard_twice_is_refused(tree: Path, tmp_path: Path) -> None:
    from finercam.locking import exclusive

    out = tmp_path / "s"
    with exclusive(out, "test", name=".lock-shard-0-of-1"), pytest.raises(
        InvalidArgumentError, match=r"another finercam run of shard 0/1 is writing to .*rerun to resume"
    ):
        _run(tree, out)
    with exclusive(out, "test", name=".lock-shard-1-of-2"):  # another shard may write into the same folder
        assert _run(tree, out, shard=(0, 2)).processed > 0
    assert _run(tree, out).already_done > 0  # released: the run resumes


def test_resume_refuses_other_settings(tree: Path, tmp_path: Path) -> None:
    _run(tree, tmp_path / "s", chunk_size=16)
    with pytest.raises(StoreError, match=r"config\.method: store 'gradcam', now 'hirescam'"):
        _run(tree, tmp_path / "s", method="hirescam")
    with pytest.raises(StoreError, match="chunk_size"):
        _run(tree, tmp_path / "s", chunk_size=8)
    _run(tree, tmp_path / "s", batch_size=4, num_workers=1)  # batch size and workers may change


def test_corrupt_chunk_is_reported(tree: Path, tmp_path: Path) -> None:
    _run(tree, tmp_path / "s")
    chunk = chunk_files(tmp_path / "s")[0]
    chunk.write_bytes(chunk.read_bytes()[:100])
    with pytest.raises(StoreError, match="chunk-000000"):
        load_store(tmp_path / "s")


def test_model_is_left_as_found(tree: Path, tmp_path: Path) -> None:
    model = cnn().model
    model.train()
    flags = [p.requires_grad for p in model.parameters()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        _run(tree, tmp_path / "s", num_workers=1)
        assert model.training and [p.requires_grad for p in model.parameters()] == flags
        assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
        assert all(p.grad is None for p in model.parameters())
    finally:
        model.eval()


def test_official_export_format(tree: Path, tmp_path: Path) -> None:
    _run(tree, tmp_path / "s")
    store = load_store(tmp_path / "s")
    report = export_official(store, tmp_path / "npy", 1.0, limit=3)
    first = store.ok_records()[0]
    folder, stem = Path(first.id).parts[0], Path(first.id).stem
    assert report.written[0].name == f"{folder}_{stem}.npy"
    loaded = np.load(report.written[0], allow_pickle=True).item()
    assert set(loaded) == {"Baseline", "Finer-Default"}
    finer = loaded["Finer-Default"]
    assert finer["highres"].dtype == np.float16 and finer["highres"].shape == (1, 64, 64)
    assert finer["main_category"] == [int(store.targets[0])] and finer["gamma"] == 1.0
    assert finer["comparison_categories"] == [store.references[0].tolist()]
    expected = render_map(store, 0, 1.0, (64, 64)).half().numpy()
    np.testing.assert_array_equal(finer["highres"][0], expected)


def test_official_names_carry_the_class_not_the_parent_folder(tree: Path, tmp_path: Path) -> None:
    """The official scripts read one folder per class: in a nested tree the class is the top folder."""
    import shutil

    first = sorted(p for p in tree.rglob("*.png"))[0]
    nested = tmp_path / "nested" / first.parent.name / "sub"
    nested.mkdir(parents=True)
    shutil.copy(first, nested / "a.png")
    _run(tmp_path / "nested", tmp_path / "s")
    report = export_official(load_store(tmp_path / "s"), tmp_path / "npy", 1.0)
    assert [path.name for path in report.written] == [f"{first.parent.name}_a.npy"]


def test_command_line(tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "s"
    status = main(["run", "--model", "embedded:cnn", "--data", str(tree), "--out", str(out), "--batch-size", "8",
                   "--chunk-size", "16", "--workers", "0", "--quiet", "--gammas", "0.3", "0.6"])
    printed = capsys.readouterr().out
    assert status == 0 and f"this run: {COUNT} images" in printed and "accuracy" in printed
    assert json.loads((out / "summary.json").read_text())["explained"] == COUNT
    assert main(["visualize", str(out), "--out", str(tmp_path / "grids"), "--limit", "2", "--gamma", "1.5"]) == 0
    assert len(list((tmp_path / "grids").rglob("*.png"))) == 2
    assert main(["report", str(out), "--out", str(tmp_path / "g.html"), "--order", "margin", "--limit", "5"]) == 0
    assert (tmp_path / "g.html").read_text().count('class="card"') == 5
    assert main(["export", str(out), "--out", str(tmp_path / "png"), "--limit", "2"]) == 0
    assert main(["run", "--model", "embedded:cnn", "--data", str(tree), "--out", str(tmp_path / "t"), "--amp",
                 "bf16", "--device", "cpu", "--workers", "0", "--quiet"]) == 2
    refused = capsys.readouterr()
    assert "--amp bf16 needs a CUDA device" in refused.err and "run:" not in refused.out  # before the run's header
    assert not (tmp_path / "t").exists()
    assert main(["visualize", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2
    assert "not a finercam result store" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["run", "--model", "embedded:cnn", "--data", str(tree), "--out", str(out), "--shard", "3/3"])


def test_settings_are_checked() -> None:
    for bad in ({"gammas": ()}, {"gammas": (-1.0,)}, {"gammas": (0.6, 0.6)}, {"batch_size": 0},
                {"references": "random"}, {"shard": (2, 2)}, {"amp": "fp8"}, {"method": "nope"}):
        with pytest.raises(InvalidArgumentError):
            RunSettings(**bad).check()  # type: ignore[arg-type]
    assert math.isclose(RunSettings().gammas[0], 0.6)
    with pytest.raises(InvalidArgumentError, match=r"gammas \[0\] alone would store Finer-CAM maps equal to the base"):
        RunSettings(gammas=(0.0,)).check()  # mean aggregation: gamma 0 is the baseline, stored anyway
    RunSettings(gammas=(0.0,), aggregation="softmax").check()  # not the baseline there: gradients flow through p
    RunSettings(gammas=(0.0, 0.6)).check()
    assert normalize_maps(torch.zeros(2, 2), (4, 4)).sum() == 0


def test_images_of_several_sizes(tmp_path: Path) -> None:
    """Preprocessing that keeps the aspect ratio: each batch is explained per input size; maps of several sizes are
    stored side by side, rows stay in listing order, and each equals FinerCAM on that image's size group."""
    from PIL import Image

    from finercam.models.preprocess import Preprocess

    tree = tmp_path / "data"
    sizes = [(64, 48), (48, 64), (64, 64), (64, 48), (40, 72), (48, 64), (64, 64)]
    generator = np.random.default_rng(0)
    for number, (width, height) in enumerate(sizes):
        folder = tree / cnn().class_names[number % 3]
        folder.mkdir(parents=True, exist_ok=True)
        pixels = generator.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{number}.png")
    preprocess = Preprocess("keep-aspect", multiple_of=8)
    source = open_source(tree, cnn().class_names)
    run_dataset(cnn().model, preprocess, source, tmp_path / "s", RunSettings(**{**FAST, "batch_size": 4}))
    store = load_store(tmp_path / "s")
    assert store.index.tolist() == list(range(len(sizes)))
    assert {tuple(size) for size in store.map_sizes.tolist()} == {(16, 12), (12, 16), (16, 16), (18, 10)}
    cam = FinerCAM(cnn().model, cnn().target_layer)
    for batch_start in (0, 4):
        rows = list(range(batch_start, min(batch_start + 4, len(sizes))))
        from finercam.images import load_image

        images = [preprocess(load_image(source.items[row].path)) for row in rows]
        for shape in {tuple(image.shape) for image in images}:
            members = [row for row, image in zip(rows, images, strict=True) if tuple(image.shape) == shape]
            group = torch.stack([images[rows.index(row)] for row in members])
            labels = torch.tensor([source.items[row].label for row in members])
            sweep = cam.sweep(group, [0.6], targets=labels)
            for position, row in enumerate(members):
                assert store.input_sizes[row].tolist() == list(shape[1:])
                assert torch.equal(store.finer_raw_maps(row)[0], sweep.layer_raw_maps[0][0, position])
                assert torch.equal(render_map(store, row, 0.6), sweep.maps[0, position])


def test_progress_line_and_summary(tree: Path, tmp_path: Path) -> None:
    import io

    from finercam.progress import Progress

    stream = io.StringIO()
    progress = Progress(10, stream=stream, interval=0.0)
    progress.update(4, skipped=1)
    progress.update(6)
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("4/10 images, 1 skipped") and "img/s" in lines[0] and "ETA" in lines[0]
    assert lines[-1].startswith("10/10 images") and lines[-1].endswith("ETA 0:00")
    summary = _run(tree, tmp_path / "s", shard=(1, 2))
    text = "\n".join(summary.lines())
    assert f"(shard 1/2: {summary.in_shard} of {COUNT} images)" in text and "chunk files: 1" in text
    assert (tmp_path / "s" / "summary-shard-1-of-2.json").is_file()


def test_gallery_cards_carry_each_class_role_for_the_search(tree: Path, tmp_path: Path) -> None:
    """The gallery's search box looks in one role at a time (true, explained, predicted, reference classes) or in all:
    each card carries exactly the store's names for each role, lower-cased, and the page offers every role."""
    from html.parser import HTMLParser

    from finercam.dataset.gallery import SEARCH_FIELDS, write_gallery

    _run(tree, tmp_path / "s")
    store = load_store(tmp_path / "s")
    page, _ = write_gallery(store, tmp_path / "g.html", limit=None)

    class Cards(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.cards: list[dict[str, str]] = []
            self.fields: list[str] = []

        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            values = {key: value or "" for key, value in attrs}
            if values.get("class") == "card":
                self.cards.append(values)
            if tag == "option" and values["value"] in SEARCH_FIELDS:
                self.fields.append(values["value"])

    parser = Cards()
    parser.feed(page.read_text())
    assert parser.fields == list(SEARCH_FIELDS) and len(parser.cards) == len(store) == COUNT
    by_index = {int(card["data-index"]): card for card in parser.cards}
    for row, record in enumerate(store.ok_records()):
        card = by_index[record.index]
        expected = {
            "true": [store.class_name(int(store.labels[row]))],
            "explained": [store.class_name(int(store.targets[row]))],
            "predicted": [store.class_name(int(store.predictions[row]))],
            "references": [store.class_name(int(d)) for d in store.references[row]],
        }
        for key, names in expected.items():
            assert card[f"data-{key}"] == " | ".join(names).lower()
        assert set(card["data-classes"].split(" | ")) == {n.lower() for names in expected.values() for n in names}
    assert any(card["data-true"] != card["data-classes"] for card in parser.cards)  # the roles differ


def test_views_refuse_a_gamma_they_cannot_render_once_before_any_image(
    tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _run(tree, tmp_path / "s", method="layercam", gammas=(0.6, 1.0))
    for command in (["visualize", str(tmp_path / "s"), "--out", str(tmp_path / "v")],
                    ["export", str(tmp_path / "s"), "--out", str(tmp_path / "e")],
                    ["report", str(tmp_path / "s"), "--out", str(tmp_path / "r.html")]):
        assert main([*command, "--gamma", "0.3"]) == 2, command
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "gamma 0.3 is not in the store (gammas [0.6, 1.0])" in err, err
    assert not (tmp_path / "v").exists() and not (tmp_path / "e").exists() and not (tmp_path / "r.html").exists()
    store = load_store(tmp_path / "s")
    with pytest.raises(StoreError, match=r"^gamma 0\.6000001 is not in the store \(gammas \[0\.6, 1\.0\]\)"):
        render_map(store, 0, 0.6000001)  # named as given: not rounded to a stored 0.6
    with pytest.raises(StoreError, match=r"gamma must be a finite number >= 0; got nan"):
        render_map(store, 0, float("nan"))
    for row in (-1, COUNT):
        with pytest.raises(StoreError, match=rf"row {row} is not in the store: rows go from 0 to {COUNT - 1}"):
            render_map(store, row, 0.6)


def test_a_stores_manifest_given_for_its_folder_is_named(tree: Path, tmp_path: Path) -> None:
    _run(tree, tmp_path / "s")
    with pytest.raises(StoreError, match=r"store\.json' is the store's manifest; give the store's folder, '.*/s'"):
        load_store(tmp_path / "s" / "store.json")
