"""Reading a result store written by ``finercam run`` (the format is described in :mod:`finercam.dataset.store`):
:func:`load_store` gives a :class:`ResultStore` of records and per-row tensors, shards in one or several folders."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from finercam.dataset.store import (
    MAP_TENSORS,
    RESOLVED,
    ROW_TENSORS,
    StoreError,
    check_chunk,
    chunk_files,
    compare_manifests,
    read_chunk,
    read_manifest,
)


@dataclass(frozen=True)
class ImageRecord:
    """One listing position of a store.

    Attributes:
        index: listing position.
        id: the image's identifier (path relative to the ImageFolder root, or as written in the list).
        path: the file that was read.
        status: ``"ok"`` or ``"skipped"``.
        reason: why it was skipped.
        row: its row in the store's tensors, or ``None`` when skipped.
    """

    index: int
    id: str
    path: str
    status: str
    reason: str | None
    row: int | None


@dataclass(frozen=True)
class ResultStore:
    """A loaded result store: one record per listing position done, one tensor row per explained image.

    Rows are sorted by listing position. Maps of image ``row`` are :meth:`baseline_raw_map` and
    :meth:`finer_raw_maps` (signed, before the ReLU, at layer resolution); render them with
    :mod:`finercam.dataset.render`.

    Attributes:
        roots: the store folders read.
        manifest: the parsed ``store.json``.
        records: every listing position of the chunks present, sorted.
        chunks: the chunk numbers present.
        index, labels, targets, references, logits, input_sizes, image_sizes, map_sizes: per-row tensors (see the
            module documentation).
        baseline_raw, finer_raw: the concatenated maps; ``map_offsets`` ``(n + 1,)`` start of each row's baseline.
        layers: the target layers, as resolved by the run.
    """

    roots: tuple[Path, ...]
    manifest: dict[str, Any]
    records: tuple[ImageRecord, ...]
    chunks: tuple[int, ...]
    index: Tensor
    labels: Tensor
    targets: Tensor
    references: Tensor
    logits: Tensor
    input_sizes: Tensor
    image_sizes: Tensor
    map_sizes: Tensor
    baseline_raw: Tensor
    finer_raw: Tensor
    map_offsets: Tensor
    layers: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.index.shape[0])

    @property
    def config(self) -> dict[str, Any]:
        return self.manifest["config"]

    @property
    def gammas(self) -> tuple[float, ...]:
        return tuple(float(g) for g in self.config["gammas"])

    @property
    def method(self) -> str:
        return str(self.config["method"])

    @property
    def class_names(self) -> tuple[str, ...] | None:
        names = self.manifest.get("class_names")
        return tuple(names) if names is not None else None

    @property
    def total(self) -> int:
        """Images in the whole listing."""
        return int(self.manifest["data"]["count"])

    @property
    def chunk_count(self) -> int:
        """Chunks of the whole run."""
        return -(-self.total // int(self.manifest["chunk_size"]))

    @property
    def missing_chunks(self) -> tuple[int, ...]:
        """Chunks not (yet) in the store: a run that was interrupted, or shards not loaded."""
        present = set(self.chunks)
        return tuple(chunk for chunk in range(self.chunk_count) if chunk not in present)

    def missing_shards(self) -> tuple[tuple[int, int], ...]:
        """Shards ``(I, N)`` none of whose chunks are in the store, for the shard counts ``N`` that the loaded
        folders' ``summary-shard-I-of-N.json`` files name."""
        missing, count = set(self.missing_chunks), self.chunk_count
        found = []
        for shards in shard_counts(self.roots):
            for index in range(shards):
                own = range(index, count, shards)
                if len(own) and all(chunk in missing for chunk in own):
                    found.append((index, shards))
        return tuple(found)

    def coverage_note(self) -> str | None:
        """``None`` when every chunk of the run is present; else how many of the run's images are present and which
        shards or chunks are missing."""
        missing = self.missing_chunks
        if not missing:
            return None
        shards = self.missing_shards()
        in_shards = {chunk for index, count in shards for chunk in range(index, self.chunk_count, count)}
        rest = [chunk for chunk in missing if chunk not in in_shards]
        parts = []
        if shards:
            listed = ", ".join(f"{index}/{count}" for index, count in shards)
            parts.append(f"shard{'s' if len(shards) > 1 else ''} {listed} (run {'them' if len(shards) > 1 else 'it'}, "
                         "or list its store folder too)")
        if rest:
            parts.append(f"chunk{'s' if len(rest) > 1 else ''} {chunk_ranges(rest)} (the run was interrupted or is "
                         "still running: run the same command again to finish it)")
        return (
            f"the store is incomplete: {len(self.records)} of the run's {self.total} images are present "
            f"({len(self.chunks)} of {self.chunk_count} chunks); missing: {'; '.join(parts)}"
        )

    @cached_property
    def probabilities(self) -> Tensor:
        """``(n, C)`` softmax of the logits."""
        return torch.softmax(self.logits.float(), dim=1)

    @cached_property
    def predictions(self) -> Tensor:
        """``(n,)`` top class of each row."""
        return self.logits.argmax(dim=1)

    @property
    def reference_probabilities(self) -> Tensor:
        """``(n, T)`` probability of each reference class ``d_t``; NaN where a row has fewer references."""
        probabilities = self.probabilities
        gathered = probabilities.gather(1, self.references.clamp(min=0))
        return gathered.masked_fill(self.references < 0, float("nan"))

    @property
    def skipped(self) -> tuple[ImageRecord, ...]:
        return tuple(record for record in self.records if record.status != "ok")

    def class_name(self, index: int) -> str:
        """The name of class ``index`` (``class <index>`` when the store has no class names)."""
        names = self.class_names
        return names[index] if names is not None and 0 <= index < len(names) else f"class {index}"

    def ok_records(self) -> tuple[ImageRecord, ...]:
        """The records of the explained images, in row order (``ok_records()[row]``)."""
        return self._row_records

    @cached_property
    def _row_records(self) -> tuple[ImageRecord, ...]:
        return tuple(record for record in self.records if record.row is not None)

    def baseline_raw_map(self, row: int) -> Tensor:
        """``(h, w)`` signed base-CAM map of a row (``\\gamma = 0``)."""
        height, width = self.map_sizes[row].tolist()
        start = int(self.map_offsets[row])
        return self.baseline_raw[start:start + height * width].view(height, width)

    def finer_raw_maps(self, row: int) -> Tensor:
        """``(G, h, w)`` signed Finer-CAM maps of a row at the stored ``gammas``."""
        height, width = self.map_sizes[row].tolist()
        count = len(self.gammas)
        start = int(self.map_offsets[row]) * count
        return self.finer_raw[start:start + count * height * width].view(count, height, width)


_SHARD_SUMMARY = re.compile(r"^summary-shard-(\d+)-of-(\d+)\.json$")


def shard_counts(roots: Iterable[Path]) -> tuple[int, ...]:
    """The shard counts ``N`` of the sharded runs that wrote into ``roots`` (from their summary file names)."""
    counts = set()
    for root in roots:
        if root.is_dir():
            for entry in root.iterdir():
                match = _SHARD_SUMMARY.match(entry.name)
                if match and int(match.group(2)) > 1:
                    counts.add(int(match.group(2)))
    return tuple(sorted(counts))


def chunk_ranges(chunks: Sequence[int], shown: int = 8) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``"0-2, 5, 7-8"`` (at most ``shown`` runs, then how many chunks more)."""
    runs: list[list[int]] = []
    for chunk in sorted(chunks):
        if runs and chunk == runs[-1][1] + 1:
            runs[-1][1] = chunk
        else:
            runs.append([chunk, chunk])
    text = ", ".join(f"{first}-{last}" if last > first else f"{first}" for first, last in runs[:shown])
    if len(runs) > shown:
        text += f" and {sum(last - first + 1 for first, last in runs[shown:])} more"
    return text


def _merge_manifests(manifests: Sequence[dict[str, Any]], roots: Sequence[Path]) -> dict[str, Any]:
    for root, other in zip(roots[1:], manifests[1:], strict=True):
        differences = compare_manifests(manifests[0], other)
        if differences:
            raise StoreError(
                f"{str(root)!r} and {str(roots[0])!r} are not shards of one run: {'; '.join(differences[:8])}"
            )
    return next((manifest for manifest in manifests if manifest.get(RESOLVED)), manifests[0])


def load_store(path: str | Path | Iterable[str | Path]) -> ResultStore:
    """Load a result store (or several folders holding shards of one run) into memory.

    Raises:
        StoreError: not a store, a corrupt chunk or one that is not this store's (:func:`check_chunk`), shards of
            different runs, or a chunk present twice.
    """
    roots = [Path(path)] if isinstance(path, str | Path) else [Path(p) for p in path]
    if not roots:
        raise StoreError("load_store needs at least one store folder")
    manifests = [read_manifest(root) for root in roots]
    manifest = _merge_manifests(manifests, roots)
    files: dict[int, Path] = {}
    for root, own in zip(roots, manifests, strict=True):
        for chunk, file in chunk_files(root).items():
            if chunk in files:
                raise StoreError(f"chunk {chunk} is in both {str(files[chunk])!r} and {str(file)!r}")
            try:
                check_chunk(file, chunk, {**own, RESOLVED: manifest.get(RESOLVED)})
            except StoreError as error:
                raise StoreError(f"{error}; run the same finercam run command again to set it aside and explain its "
                                 "images again") from None
            files[chunk] = file
    parts: dict[str, list[Tensor]] = {name: [] for name in (*ROW_TENSORS, *MAP_TENSORS)}
    records: list[ImageRecord] = []
    layers: tuple[str, ...] = tuple((manifest.get(RESOLVED) or {}).get("layers") or ())
    rows = 0
    for chunk in sorted(files):
        tensors, metadata = read_chunk(files[chunk])
        for name in parts:
            parts[name].append(tensors[name])
        layers = tuple(json.loads(metadata.get("layers", "[]"))) or layers
        row_of = {int(index): rows + offset for offset, index in enumerate(tensors["index"].tolist())}
        rows += len(row_of)
        for entry in json.loads(metadata["records"]):
            records.append(ImageRecord(
                int(entry["index"]), entry["id"], entry["path"], entry["status"], entry.get("reason"),
                row_of.get(int(entry["index"])),
            ))
    joined = {name: _concatenate(values, name, manifest) for name, values in parts.items()}
    areas = (joined["map_sizes"][:, 0].long() * joined["map_sizes"][:, 1].long())
    offsets = torch.zeros(areas.shape[0] + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(areas, 0)
    return ResultStore(
        roots=tuple(roots), manifest=manifest, records=tuple(records), chunks=tuple(sorted(files)),
        map_offsets=offsets, layers=layers, **joined,
    )


def _concatenate(values: list[Tensor], name: str, manifest: Mapping[str, Any]) -> Tensor:
    """Join one tensor over the chunks; chunks without rows (every image skipped) are left out."""
    values = [value for value in values if value.numel()]
    if values:
        return torch.cat(values)
    outputs = manifest.get("model_outputs") or {}
    widths = {"references": int(outputs.get("num_references", 0)), "logits": int(outputs.get("num_classes", 0))}
    if name in widths:
        return torch.zeros((0, widths[name]), dtype=torch.int64 if name == "references" else torch.float32)
    if name.endswith("sizes"):
        return torch.zeros((0, 2), dtype=torch.int32)
    return torch.zeros(0, dtype=torch.float32 if name in MAP_TENSORS else torch.int64)
