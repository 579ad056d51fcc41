r"""``run_dataset``: Finer-CAM over a whole dataset, batched, resumable, sharded, into a result store.

For each batch, one :meth:`finercam.FinerCAM.sweep` call (one forward pass, two vector-Jacobian products) gives the
logits, the references ``d_t``, the baseline raw map (``\gamma = 0``) and the Finer-CAM raw maps of
``s = y_c - \gamma\,\mathrm{agg}_t\, y_{d_t}`` for every requested ``\gamma``; they stay on the model's device until
the chunk is handed to the store.

Work is planned in chunks of the listing (see :mod:`finercam.dataset.loading`): shard ``I`` of ``N`` takes the chunks
``k`` with ``k mod N == I``, a contiguous block of ``S`` images each, so that every shard reads whole folders of an
ImageFolder tree and the shards together write exactly the chunks of one run. Bad files are skipped with their reason
(:mod:`finercam.dataset.decode`); an error of the model itself stops the run, which then resumes where it stopped.

Two layouts (:func:`finercam.dataset.settings.resolve_processes`):

* **CPU**: ``P`` forked worker processes (one per core by default), each decoding, normalising and explaining whole
  batches with one torch thread (:mod:`finercam.dataset.parallel`); the parent hands out the batches and assembles
  and writes the chunks. The same batch gives bitwise the same maps in any process.
* **GPU** (or ``processes=1``): one process explains; ``DataLoader`` workers decode ahead of it
  (:func:`finercam.dataset.settings.default_workers`), and the ``uint8`` batches are normalised on the device.

``benchmarks/run_throughput.py`` measures both against the model-side time.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from finercam.dataset.decode import decode
from finercam.dataset.loading import (
    Batch,
    ImageDataset,
    SizeGroup,
    batch_loader,
    collate,
    plan_batches,
)
from finercam.dataset.parallel import forked_map, memory_fit
from finercam.dataset.progress import RunSummary
from finercam.dataset.settings import (
    RunSettings,
    autocast_for,
    build_manifest,
    default_workers,
    resolve_processes,
    target_mode,
)
from finercam.dataset.sources import DataSource
from finercam.dataset.store import (
    RESOLVED,
    StoreWriter,
    chunk_files,
    chunk_range,
    num_chunks,
    read_chunk_metadata,
    write_json,
)
from finercam.errors import InvalidArgumentError
from finercam.explain import FinerCAM
from finercam.images import check_apart
from finercam.layers import infer_device_dtype
from finercam.locking import exclusive
from finercam.models.preprocess import Preprocess
from finercam.objectives import ClassifierWeights
from finercam.progress import Progress
from finercam.result import SweepResult
from finercam.runtime import cpu_threads

_PREFLIGHT_TRIES = 64
SIZE_TENSORS = ("input_sizes", "image_sizes", "map_sizes")


def _rows(group: SizeGroup, result: SweepResult, labels: Tensor) -> dict[str, Tensor]:
    """What the store keeps of one size group's sweep, as CPU tensors."""
    index = torch.tensor(group.indices, dtype=torch.int64)
    input_size = torch.tensor(tuple(group.pixels.shape[-2:]), dtype=torch.int32)
    baseline = result.layer_baseline_raw_maps[0].detach().float().cpu()
    return {
        "index": index,
        "labels": labels[index],
        "targets": result.targets.detach().cpu().long(),
        "references": result.references.detach().cpu().long(),
        "logits": result.logits.detach().float().cpu(),
        "input_sizes": input_size.expand(len(index), 2),
        "image_sizes": group.image_sizes,
        "map_sizes": torch.tensor(tuple(baseline.shape[-2:]), dtype=torch.int32).expand(len(index), 2),
        "baseline_raw": baseline.flatten(1),
        "finer_raw": result.layer_raw_maps[0].detach().float().cpu().transpose(0, 1).flatten(1),
    }


@dataclass
class _BatchDone:
    """One explained batch: its chunk, how many positions it planned, the stored rows per size group, the skips."""

    chunk: int
    planned: int
    rows: list[dict[str, Tensor]]
    skipped: dict[int, str]


@dataclass
class _ChunkBuilder:
    """The rows of one chunk, gathered group by group on the CPU and ordered by listing position when written."""

    chunk: int
    groups: list[dict[str, Tensor]] = field(default_factory=list)
    skipped: dict[int, str] = field(default_factory=dict)

    def add(self, done: _BatchDone) -> None:
        self.groups += done.rows
        self.skipped.update(done.skipped)

    def tensors(self, outputs: Mapping[str, Any]) -> dict[str, Tensor]:
        if not self.groups:
            return {
                "index": torch.zeros(0, dtype=torch.int64), "labels": torch.zeros(0, dtype=torch.int64),
                "targets": torch.zeros(0, dtype=torch.int64),
                "references": torch.zeros((0, int(outputs.get("num_references", 0))), dtype=torch.int64),
                "logits": torch.zeros((0, int(outputs.get("num_classes", 0)))),
                **{name: torch.zeros((0, 2), dtype=torch.int32) for name in SIZE_TENSORS},
                "baseline_raw": torch.zeros(0), "finer_raw": torch.zeros(0),
            }
        names = [name for name in self.groups[0] if not name.endswith("raw")]
        joined = {name: torch.cat([group[name] for group in self.groups]) for name in names}
        order = torch.argsort(joined["index"], stable=True)
        tensors = {name: value[order] for name, value in joined.items()}
        for name in ("baseline_raw", "finer_raw"):
            parts = [group[name] for group in self.groups]
            if len({part.shape[1] for part in parts}) == 1:  # one map size: reorder the rows at once
                tensors[name] = torch.cat(parts)[order].reshape(-1)
            else:  # maps of different sizes stay separate rows
                rows = [row for part in parts for row in part]
                tensors[name] = torch.cat([rows[i] for i in order.tolist()])
        return tensors

    def records(self, source: DataSource, positions: range, explained: set[int]) -> list[dict[str, Any]]:
        records = []
        for index in positions:
            item = source.items[index]
            record: dict[str, Any] = {"index": index, "id": item.id, "path": str(item.path)}
            if index in explained:
                record["status"] = "ok"
            else:
                record["status"], record["reason"] = "skipped", self.skipped.get(index, "not processed")
            records.append(record)
        return records


class _Explainer:
    """One sweep per size group, on the model's device, under the requested autocast."""

    def __init__(
        self, model: nn.Module, preprocess: Preprocess, settings: RunSettings, target: str, labels: Tensor,
        classifier_weights: ClassifierWeights | None,
    ) -> None:
        self.cam = FinerCAM(
            model, settings.layer, settings.method, classifier_weights=classifier_weights,
            score_batch_size=settings.score_batch_size,
        )
        self.preprocess = preprocess
        self.settings = settings
        self.device = infer_device_dtype(model)[0]
        autocast_for(settings.amp, self.device)  # fails early on the CPU
        self.use_labels = target == "label"
        self.labels = labels

    def autocast(self) -> contextlib.AbstractContextManager[object]:
        return autocast_for(self.settings.amp, self.device)

    def sweep(self, pixels: Tensor, targets: Tensor | None) -> SweepResult:
        """The sweep of ``uint8`` pixels ``(n, 3, H, W)``, normalised on the model's device."""
        pixels = self.preprocess.normalise(pixels.to(self.device, non_blocking=True))
        settings = self.settings
        with self.autocast():
            return self.cam.sweep(
                pixels, settings.gammas, targets, settings.references, settings.num_references, settings.aggregation,
            )

    def explain(self, batch: Batch) -> _BatchDone:
        """Every size group of a decoded batch."""
        rows = []
        for group in batch.groups:
            targets = self.labels[group.indices].to(self.device) if self.use_labels else None
            rows.append(_rows(group, self.sweep(group.pixels, targets), self.labels))
        return _BatchDone(batch.chunk, len(batch.indices), rows, batch.skipped)


def _preflight(
    explainer: _Explainer, source: DataSource, preprocess: Preprocess, positions: Iterator[int],
    max_pixels: int | None,
) -> dict[str, Any] | None:
    """Explain the first decodable pending image for its prediction: resolves the layer, the class count ``C`` and
    ``T``, and checks the labels and class names against ``C`` before any worker starts. ``None`` when no pending
    image decodes."""
    for _, index in zip(range(_PREFLIGHT_TRIES), positions, strict=False):
        decoded = decode(source.items[index].path, preprocess, max_pixels)
        if decoded.pixels is None:
            continue
        result = explainer.sweep(decoded.pixels[None], None)
        if len(result.layers) != 1:
            raise InvalidArgumentError(f"a run stores one target layer; got {list(result.layers)}")
        num_classes = int(result.logits.shape[1])
        names = source.class_names
        if names is not None and source.label_source != "folder-order" and len(names) != num_classes:
            raise InvalidArgumentError(
                f"the model has {num_classes} classes but {len(names)} class names are given; the class names "
                "must be the model's, one per output, in order"
            )
        largest = int(explainer.labels.max()) if explainer.labels.numel() else -1
        if largest >= num_classes:
            raise InvalidArgumentError(
                f"the model has {num_classes} classes but the data has {largest + 1} or more ({source.label_source} "
                f"labels); give the model's class names in order with --class-names FILE"
            )
        return {"layers": list(result.layers), "num_classes": num_classes,
                "num_references": int(result.references.shape[1])}
    return None


def _summarise(
    summary: RunSummary, root: Path, source: DataSource, chunks: list[int], settings: RunSettings
) -> RunSummary:
    """Fill the shard-wide parts of the summary from the chunk files (metadata and two small tensors)."""
    from safetensors import safe_open

    files = chunk_files(root)
    skipped: list[tuple[str, str]] = []
    correct = labelled = 0
    for chunk in chunks:
        if chunk not in files:
            continue
        metadata = read_chunk_metadata(files[chunk])
        skipped += [(r["id"], r["reason"]) for r in json.loads(metadata["records"]) if r["status"] != "ok"]
        with safe_open(files[chunk], framework="pt") as handle:
            labels, logits = handle.get_tensor("labels"), handle.get_tensor("logits")
        if logits.numel():
            known = labels >= 0
            labelled += int(known.sum())
            correct += int((logits.argmax(1)[known] == labels[known]).sum())
    summary.set_skipped(skipped)
    summary.accuracy = correct / labelled if labelled else None
    summary.chunk_files = len(files)
    summary.notes = [*source.notes, f"explained class c: {settings.target}"]
    return summary


def run_dataset(
    model: nn.Module,
    preprocess: Preprocess,
    source: DataSource,
    out: str | Path,
    settings: RunSettings | None = None,
    *,
    model_info: Mapping[str, Any] | None = None,
    classifier_weights: ClassifierWeights | None = None,
    log: Callable[[str], None] | None = None,
) -> RunSummary:
    r"""Explain every image of ``source`` with Finer-CAM into the result store ``out`` (created or resumed).

    Args:
        model: the classifier, on its device, in eval mode (left exactly as found).
        preprocess: PIL image -> ``(3, H, W)`` tensor, as the model expects.
        source: the listing and labels (:func:`finercam.dataset.sources.open_source`).
        out: the store folder; a store made with the same settings and listing is resumed.
        settings: see :class:`RunSettings`.
        model_info: what identifies the model in the manifest (spec, weights, head).
        classifier_weights: the classifier rows or linear head, for ``references="weights"``.
        log: receives notes before the run (default: nothing).

    Returns:
        The :class:`RunSummary`, also written to ``summary.json`` in ``out``.

    Raises:
        InvalidArgumentError: bad settings, labels that do not fit the model, ``amp`` without CUDA, ``out`` inside
            the ImageFolder tree (or the tree inside ``out``).
        StoreError: ``out`` holds a store made with other settings or another listing.
    """
    settings = settings or RunSettings()
    settings.check()
    root = Path(out)
    if source.kind == "image-folder":
        check_apart(source.location, root)
    target = target_mode(settings, source)
    info = dict(model_info) if model_info is not None else {"class": type(model).__name__}
    labels = torch.tensor([-1 if item.label is None else item.label for item in source.items], dtype=torch.int64)
    explainer = _Explainer(model, preprocess, settings, target, labels, classifier_weights)
    writer = StoreWriter(root, build_manifest(settings, source, preprocess, target, info), settings.shard)
    index, count = settings.shard
    total = len(source.items)
    mine = [chunk for chunk in range(num_chunks(total, settings.chunk_size)) if chunk % count == index]
    completed = writer.completed()
    pending = [chunk for chunk in mine if chunk not in completed]
    summary = RunSummary(
        str(root), [index, count], total, sum(len(chunk_range(c, settings.chunk_size, total)) for c in mine),
        already_done=sum(len(chunk_range(c, settings.chunk_size, total)) for c in mine if c in completed),
    )
    log = log or (lambda _line: None)
    for note in (*source.notes, *writer.notes):
        log(f"note: {note}")
    if not mine and total:
        chunks = num_chunks(total, settings.chunk_size)
        log(f"note: shard {index} of {count} gets no chunk: the run has {chunks} chunk(s) of {settings.chunk_size} "
            f"images ({total} images), so at most {chunks} shards have work; a smaller --chunk-size makes more chunks")

    batches = plan_batches(pending, settings.chunk_size, settings.batch_size, total)
    if batches:
        positions = (position for batch in batches for position in batch)
        writer.commit(_preflight(explainer, source, preprocess, positions, settings.max_pixels))
        with exclusive(root, f"finercam run of shard {index}/{count}", name=f".lock-shard-{index}-of-{count}"):
            _process(writer, explainer, source, preprocess, batches, settings, summary, log)
    else:
        writer.commit()
    _summarise(summary, root, source, mine, replace(settings, target=target))
    name = "summary.json" if count == 1 else f"summary-shard-{index}-of-{count}.json"
    write_json(root / name, summary.as_dict())
    return summary


def _process(
    writer: StoreWriter, explainer: _Explainer, source: DataSource, preprocess: Preprocess,
    batches: list[list[int]], settings: RunSettings, summary: RunSummary, log: Callable[[str], None],
) -> None:
    """The loop: decoded batches in, chunks out; in forked CPU workers when ``processes > 1`` (as many as the memory
    allows when ``settings.processes`` is not given)."""
    dataset = ImageDataset(source.items, preprocess, settings.max_pixels)
    processes = resolve_processes(settings, explainer.device)
    progress = Progress(sum(len(batch) for batch in batches), enabled=settings.progress)
    assembler = _Assembler(writer, source, settings, batches, {
        "batch_size": str(settings.batch_size), "device": str(explainer.device), "amp": settings.amp,
        "processes": str(processes), "threads": str(1 if processes > 1 else torch.get_num_threads()),
    })
    if processes > 1:
        def explain(planned: list[int]) -> _BatchDone:
            return explainer.explain(collate([dataset[index] for index in planned], settings.chunk_size))

        fit = memory_fit(processes, log) if settings.processes is None else None
        done_batches: Iterator[_BatchDone] = (done for _, done in forked_map(explain, batches, processes, fit))
    else:
        workers = settings.num_workers if settings.num_workers is not None else default_workers(explainer.device)
        loader = batch_loader(
            dataset, batches, settings.chunk_size, num_workers=workers, pin_memory=explainer.device.type == "cuda",
        )
        done_batches = (explainer.explain(batch) for batch in loader)
    # while forked workers fill every core, the parent's small tensor work runs on one thread: torch's thread pool
    # would otherwise spin against the workers
    with cpu_threads(1 if processes > 1 else None):
        for done in done_batches:
            assembler.add(done)
            progress.update(done.planned, len(done.skipped))
    summary.processed = progress.done
    summary.explained = progress.done - progress.skipped
    summary.skipped = progress.skipped
    summary.seconds = progress.elapsed
    summary.images_per_second = progress.rate


class _Assembler:
    """Gathers explained batches (in any order) into chunks and writes each chunk once all its batches are in."""

    def __init__(
        self, writer: StoreWriter, source: DataSource, settings: RunSettings, batches: list[list[int]],
        metadata: dict[str, str],
    ) -> None:
        self.writer, self.source, self.chunk_size = writer, source, settings.chunk_size
        self.outputs = writer.manifest.get(RESOLVED) or {}
        self.metadata = metadata
        self.remaining: dict[int, int] = {}
        for batch in batches:
            chunk = batch[0] // settings.chunk_size
            self.remaining[chunk] = self.remaining.get(chunk, 0) + 1
        self.builders: dict[int, _ChunkBuilder] = {}

    def add(self, done: _BatchDone) -> None:
        builder = self.builders.setdefault(done.chunk, _ChunkBuilder(done.chunk))
        builder.add(done)
        self.remaining[done.chunk] -= 1
        if self.remaining[done.chunk] == 0:
            del self.builders[done.chunk]
            self._write(builder)

    def _write(self, builder: _ChunkBuilder) -> None:
        tensors = builder.tensors(self.outputs)
        positions = chunk_range(builder.chunk, self.chunk_size, len(self.source.items))
        records = builder.records(self.source, positions, set(tensors["index"].tolist()))
        self.writer.write_chunk(builder.chunk, tensors, {
            **self.metadata, "layers": json.dumps(list(self.outputs.get("layers") or [])),
            "records": json.dumps(records, ensure_ascii=False),
        })
