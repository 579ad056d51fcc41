"""Each chunk file is checked against its store: a chunk copied in from another store, under another number, or
written with other gammas is refused by the reader with its name and set aside and explained again on resume."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from safetensors.torch import save_file

from finercam.dataset import RunSettings, load_store, open_source, run_dataset
from finercam.dataset.store import StoreError, chunk_files, read_chunk
from run_data import EMBEDDED_PREPROCESS, assert_same_store, cnn, synthetic_tree

FAST = {"batch_size": 8, "chunk_size": 16, "num_workers": 0, "progress": False}


@pytest.fixture(scope="module")
def trees(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two listings of 40 images each (chunks 0-2 of 16, 16 and 8 images), with different pictures."""
    return (synthetic_tree(tmp_path_factory.mktemp("a"), 40, seed=11),
            synthetic_tree(tmp_path_factory.mktemp("b"), 40, seed=12))


def _run(tree: Path, out: Path, log: Callable[[str], None] | None = None, **settings: object):
    source = open_source(tree, cnn().class_names)
    return run_dataset(cnn().model, EMBEDDED_PREPROCESS, source, out,  # type: ignore[arg-type]
                       RunSettings(**{**FAST, **settings}), log=log)


def _legacy(path: Path) -> None:
    """Rewrite a chunk as finercam wrote it before chunks carried the settings digest."""
    tensors, metadata = read_chunk(path)
    save_file(tensors, path, metadata={key: value for key, value in metadata.items() if key != "settings"})


def _refused_then_redone(tree: Path, store: Path, reference: Path, chunk: int, reason: str) -> None:
    """The reader names the chunk and why; the same run again sets it aside and gives the reference store again."""
    with pytest.raises(StoreError, match=rf"chunk-00000{chunk}\.safetensors' is not chunk {chunk} of this store: "
                                         rf"{reason}.*run the same finercam run command again"):
        load_store(store)
    lines: list[str] = []
    summary = _run(tree, store, log=lines.append)
    redone = 8 if chunk == 2 else 16
    assert summary.processed == redone and summary.already_done == 40 - redone
    assert any(f"'chunk-00000{chunk}.safetensors.damaged'" in line and "explained again" in line for line in lines)
    assert (store / "chunks" / f"chunk-00000{chunk}.safetensors.damaged").exists()  # kept, not deleted
    assert_same_store(load_store(store), load_store(reference))


def test_a_chunk_of_another_listing_is_refused_and_redone(trees: tuple[Path, Path], tmp_path: Path) -> None:
    _run(trees[0], tmp_path / "full")
    _run(trees[1], tmp_path / "other")
    shutil.copytree(tmp_path / "full", tmp_path / "s")
    shutil.copyfile(chunk_files(tmp_path / "other")[1], chunk_files(tmp_path / "s")[1])
    _refused_then_redone(trees[0], tmp_path / "s", tmp_path / "full", 1, "it was written by a run with other settings")


def test_a_chunk_under_another_number_is_refused_and_redone(trees: tuple[Path, Path], tmp_path: Path) -> None:
    _run(trees[0], tmp_path / "full")
    shutil.copytree(tmp_path / "full", tmp_path / "s")
    shutil.copyfile(chunk_files(tmp_path / "s")[0], chunk_files(tmp_path / "s")[2])
    _refused_then_redone(trees[0], tmp_path / "s", tmp_path / "full", 2, "its metadata says it is chunk 0")


def test_older_chunks_are_checked_by_their_contents(trees: tuple[Path, Path], tmp_path: Path) -> None:
    """Chunks without the digest still load; one of a run with two gammas would cut the maps of every later row
    wrongly, and is refused by the length of its maps."""
    _run(trees[0], tmp_path / "full")
    _run(trees[0], tmp_path / "two", gammas=(0.6, 1.0))
    shutil.copytree(tmp_path / "full", tmp_path / "s")
    for path in chunk_files(tmp_path / "s").values():
        _legacy(path)
    assert_same_store(load_store(tmp_path / "s"), load_store(tmp_path / "full"))
    shutil.copyfile(chunk_files(tmp_path / "two")[1], chunk_files(tmp_path / "s")[1])
    _legacy(chunk_files(tmp_path / "s")[1])
    _refused_then_redone(trees[0], tmp_path / "s", tmp_path / "full", 1,
                         r"its 'finer_raw' holds \[\d+\] values, its map_sizes and 1 gammas need \d+")


def test_a_chunk_whose_rows_and_records_disagree_is_refused(trees: tuple[Path, Path], tmp_path: Path) -> None:
    _run(trees[0], tmp_path / "s")
    path = chunk_files(tmp_path / "s")[0]
    tensors, metadata = read_chunk(path)
    save_file({**tensors, "index": tensors["index"].flip(0)}, path, metadata=metadata)
    with pytest.raises(StoreError, match="its 16 rows are not its 16 explained records"):
        load_store(tmp_path / "s")
    save_file({**tensors, "logits": tensors["logits"][:, :-1].contiguous()}, path, metadata=metadata)
    with pytest.raises(StoreError, match=r"its 'logits' tensor is \[16, 23\], the chunk's 16 images need 16x24"):
        load_store(tmp_path / "s")


def test_shards_in_separate_folders_share_the_digest(trees: tuple[Path, Path], tmp_path: Path) -> None:
    """Chunks of two shards of one run are interchangeable: a chunk moved from one shard folder to the other loads."""
    _run(trees[0], tmp_path / "full")
    _run(trees[0], tmp_path / "part0", shard=(0, 2))
    _run(trees[0], tmp_path / "part1", shard=(1, 2))
    moved = chunk_files(tmp_path / "part1")[1]
    shutil.move(moved, tmp_path / "part0" / "chunks" / moved.name)
    assert_same_store(load_store([tmp_path / "part0", tmp_path / "part1"]), load_store(tmp_path / "full"))
