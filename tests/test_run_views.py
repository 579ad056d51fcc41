"""The views of a result store (``visualize``, ``report``, ``export``) and their output folders: a folder holds one
view of one store (the same view again, or the run's other shards, write into it; another is refused), images
changed since the run are left out, and very wide images still fit the gallery."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from finercam.errors import InvalidArgumentError
from run_data import dataset_cli, tiny_model, tiny_run


def test_a_view_folder_holds_one_view_and_refuses_another(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model, weights, data = tiny_model(tmp_path / "m")
    store, other = tmp_path / "store", tmp_path / "other"
    assert tiny_run(model, weights, data, store) == 0
    assert tiny_run(model, weights, data, other) == 0
    out = tmp_path / "png"
    assert dataset_cli("export", store, "--out", out) == 0
    files = {path: path.read_bytes() for path in out.rglob("*.png")}
    assert len(files) == 6
    assert dataset_cli("export", store, "--out", out, "--limit", "2") == 0  # the same view again: written in place
    capsys.readouterr()
    for argv, said in (
        (["export", store, "--out", out, "--gamma", "0.3"], "holds png overlays made with other settings (gamma: "
                                                            "was 0.6, now 0.3)"),
        (["export", other, "--out", out], "holds png overlays made with other settings (stores: was"),
        (["export", store, "--out", out, "--format", "official"], "holds png overlays, not official .npy files"),
        (["visualize", store, "--out", out], "holds png overlays, not comparison grids"),
    ):
        with pytest.raises(InvalidArgumentError, match=re.escape(said)):
            dataset_cli(*argv)
    assert {path: path.read_bytes() for path in out.rglob("*.png")} == files  # nothing overwritten or added
    assert dataset_cli("visualize", store, "--out", tmp_path / "grids") == 0
    with pytest.raises(InvalidArgumentError, match=re.escape("(panel: was 224, now 100)")):
        dataset_cli("visualize", store, "--out", tmp_path / "grids", "--panel", "100")


def test_views_leave_out_an_image_changed_since_the_run_and_a_new_run_is_another_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    model, weights, data = tiny_model(tmp_path / "m")
    store = tmp_path / "store"
    assert tiny_run(model, weights, data, store) == 0
    picture = data.parent / "2.png"
    Image.open(picture).crop((0, 0, 16, 12)).save(picture)  # edited after the run: 16 x 12 instead of 16 x 16
    capsys.readouterr()
    assert dataset_cli("export", store, "--out", tmp_path / "png") == 0
    printed = capsys.readouterr().out
    assert "wrote 5 png files" in printed
    assert "2.png is 16 x 12 pixels, but the run explained a 16 x 16 image there: it changed since" in printed
    shutil.rmtree(store)  # a new run at the same path is another store: its views do not mix with the old one's
    assert tiny_run(model, weights, data, store) == 0
    with pytest.raises(InvalidArgumentError, match=r"holds png overlays made with other settings \(stores: was"):
        dataset_cli("export", store, "--out", tmp_path / "png")


def test_the_gallery_shows_a_very_wide_image(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import base64
    import io

    model, weights, data = tiny_model(tmp_path / "m")
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (1, 2000, 3), dtype=np.uint8)).save(data.parent / "0.png")
    store = tmp_path / "store"
    assert tiny_run(model, weights, data, store, "--preprocess", "none@16x16") == 0
    capsys.readouterr()
    assert dataset_cli("report", store, "--out", tmp_path / "g.html") == 0
    assert "6 explained images in the store; 0 left out of the gallery" in capsys.readouterr().out  # JPEG took it
    page = (tmp_path / "g.html").read_text()
    widths = [Image.open(io.BytesIO(base64.b64decode(encoded.split('"')[0]))).size
              for encoded in page.split("data:image/jpeg;base64,")[1:]]
    assert len(widths) == 6 and max(width for width, _ in widths) <= 3 * 4 * 128 + 4  # panels at most 4:1


def test_a_view_folder_takes_the_other_shards_and_refuses_an_older_view(tmp_path: Path) -> None:
    model, weights, data = tiny_model(tmp_path / "m")
    shards = [tmp_path / f"shard{k}" for k in range(2)]
    for k, shard in enumerate(shards):
        assert tiny_run(model, weights, data, shard, "--chunk-size", "2", "--shard", f"{k}/2") == 0
    out = tmp_path / "png"
    assert dataset_cli("export", shards[0], "--out", out) == 0
    assert dataset_cli("export", *shards, "--out", out) == 0  # the run grown by its other shard: the same view
    assert len(list(out.rglob("*.png"))) == 6
    with pytest.raises(InvalidArgumentError, match=r"other settings \(stores: was"):
        dataset_cli("export", shards[1], "--out", out)  # a shard the folder's view does not cover is another store
    older = tmp_path / "older"
    (older / "class_0").mkdir(parents=True)
    (older / "class_0" / "0-0f25cc56.png").write_bytes(b"an export made before views were recorded")
    said = "already holds images or .npy files but no finercam-view.json"
    with pytest.raises(InvalidArgumentError, match=re.escape(said)):
        dataset_cli("export", shards[0], "--out", older)
