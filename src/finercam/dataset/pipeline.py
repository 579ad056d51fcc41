r"""``run_dataset``: Finer-CAM over a whole dataset, batched, resumable, sharded, into a result store.

For each batch, one :meth:`finercam.FinerCAM.sweep` call (one forward pass, two vector-Jacobian products) gives the
logits, the references ``d_t``, the baseline raw map (``\gamma = 0``) and the Finer-CAM raw maps of
``s = y_c - \gamma\,\mathrm{agg}_t\, y_{d_t}`` for every requested ``\gamma``; they stay on the model's device until
the chunk is handed to the store. Decoding runs in ``DataLoader`` worker processes, ahead of the model.

Work is planned in chunks of the listing (see :mod:`finercam.dataset.loading`): shard ``I`` of ``N`` takes the chunks
``k`` with ``k mod N == I``, a contiguous block of ``S`` images each, so that every shard reads whole folders of an
ImageFolder tree and the shards together write exactly the chunks of one run. Bad files are skipped with their reason
(:mod:`finercam.dataset.decode`); an error of the model itself stops the run, which then resumes where it stopped.

Decoding overlaps the CAMs only where cores are free: on CUDA (:func:`default_workers` gives all cores but one to
decoding). On a CPU-only machine torch's threads already fill every core, extra decoding processes only oversubscribe
them, and the end-to-end time is about ``model + decoding`` (``benchmarks/run_throughput.py`` prints both).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import PIL
import safetensors
import torch
from torch import Tensor, nn

import finercam
from finercam.dataset.decode import decode
from finercam.dataset.loading import Batch, ImageDataset, SizeGroup, batch_loader, chunk_range, num_chunks, plan_batches
from finercam.dataset.progress import RunSummary
from finercam.dataset.sources import DataSource
from finercam.dataset.store import (
    RESOLVED,
    STORE_FORMAT,
    STORE_VERSION,
    StoreWriter,
    chunk_files,
    read_chunk_metadata,
    write_json,
)
from finercam.errors import InvalidArgumentError
from finercam.explain import DEFAULT_GAMMA, DEFAULT_NUM_REFERENCES, FinerCAM
from finercam.layers import infer_device_dtype
from finercam.methods import get_method
from finercam.models.preprocess import Preprocess
from finercam.objectives import AGGREGATIONS, ClassifierWeights
from finercam.progress import Progress
from finercam.result import SweepResult

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
TARGETS = ("auto", "label", "prediction")
REFERENCE_STRATEGIES = ("nearest", "top", "weights")
DEFAULT_CHUNK_SIZE = 512
DEFAULT_BATCH_SIZE = 32
_PREFLIGHT_TRIES = 64
SIZE_TENSORS = ("input_sizes", "image_sizes", "map_sizes")


def default_workers(device: torch.device) -> int:
    """Decoding processes for a model on ``device``.

    On CUDA the cores are free for decoding: all but one (for the main process), at most 8. On the CPU, torch's
    threads already use every core, so a worker only pays when cores are left over: ``(cores - 2) // 2`` (at most 4).
    On 2 cores that is 0 (decoding in the main process), which measured faster than one worker on a busy 2-core
    machine (``benchmarks/run_throughput.py --workers 0`` vs ``--workers 1``).
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    if device.type == "cuda":
        return max(1, min(8, cores - 1))
    return max(0, min(4, (cores - 2) // 2))


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` (``0 <= I < N``) -> ``(I, N)``."""
    index, sep, count = text.partition("/")
    try:
        shard = (int(index), int(count))
    except ValueError:
        shard = (-1, 0)
    if not sep or shard[1] < 1 or not 0 <= shard[0] < shard[1]:
        raise InvalidArgumentError(f"--shard must be I/N with 0 <= I < N (e.g. 0/4 ... 3/4); got {text!r}")
    return shard


@dataclass(frozen=True)
class RunSettings:
    r"""How to explain a dataset.

    Attributes:
        method: base CAM (``gradcam``, ``hirescam``, ``xgradcam``, ``gradcam++``, ``layercam``, ``scorecam``).
        layer: target layer name, or ``"auto"``.
        gammas: comparison strengths ``\gamma`` stored per image (the baseline ``\gamma = 0`` is always stored).
        references: ``"nearest"``, ``"top"`` or ``"weights"``.
        num_references: ``T``.
        aggregation: ``"mean"`` (paper) or ``"softmax"``.
        target: the class ``c`` to explain: ``"label"`` (ground truth, as the official scripts do), ``"prediction"``,
            or ``"auto"`` (the label when every image has one, else the prediction).
        batch_size: images per forward pass.
        chunk_size: images per store chunk ``S`` (fixed for the life of a store).
        num_workers: decoding processes (``None``: :func:`default_workers` for the model's device; ``0``: decode in
            the main process).
        amp: ``"none"``, ``"bf16"`` or ``"fp16"`` autocast (CUDA only).
        shard: ``(I, N)``.
        max_pixels: the decompression-bomb limit (``None``: Pillow's).
        progress: print the progress line on stderr.
        score_batch_size: masked inputs per forward pass for Score-CAM.
    """

    method: str = "gradcam"
    layer: str = "auto"
    gammas: tuple[float, ...] = (DEFAULT_GAMMA,)
    references: str = "nearest"
    num_references: int = DEFAULT_NUM_REFERENCES
    aggregation: str = "mean"
    target: str = "auto"
    batch_size: int = DEFAULT_BATCH_SIZE
    chunk_size: int = DEFAULT_CHUNK_SIZE
    num_workers: int | None = None
    amp: str = "none"
    shard: tuple[int, int] = (0, 1)
    max_pixels: int | None = None
    progress: bool = True
    score_batch_size: int = 64

    def check(self) -> None:
        get_method(self.method)
        for name, value, choices in (
            ("references", self.references, REFERENCE_STRATEGIES), ("aggregation", self.aggregation, AGGREGATIONS),
            ("target", self.target, TARGETS), ("amp", self.amp, ("none", *AMP_DTYPES)),
        ):
            if value not in choices:
                raise InvalidArgumentError(f"{name} must be one of {list(choices)}; got {value!r}")
        for name in ("batch_size", "chunk_size", "num_references", "score_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidArgumentError(f"{name} must be an int >= 1; got {value!r}")
        if not self.gammas or any(not 0 <= float(g) < float("inf") for g in self.gammas):
            raise InvalidArgumentError(f"gammas must be one or more finite numbers >= 0; got {list(self.gammas)}")
        if len(set(self.gammas)) != len(self.gammas):
            raise InvalidArgumentError(f"gammas repeats a value: {list(self.gammas)}")
        index, count = self.shard
        if count < 1 or not 0 <= index < count:
            raise InvalidArgumentError(f"shard must be (I, N) with 0 <= I < N; got {self.shard}")


def _autocast(amp: str, device: torch.device) -> contextlib.AbstractContextManager[object]:
    if amp == "none":
        return contextlib.nullcontext()
    if device.type != "cuda":
        raise InvalidArgumentError(
            f"--amp {amp} needs a CUDA device; the model is on {device}. Use --amp none on the CPU"
        )
    return torch.autocast(device_type="cuda", dtype=AMP_DTYPES[amp])


def _target_mode(settings: RunSettings, source: DataSource) -> str:
    if settings.target == "auto":
        return "label" if source.has_labels else "prediction"
    if settings.target == "label" and not source.has_labels:
        missing = [item.id for item in source.items if item.label is None]
        raise InvalidArgumentError(
            f"target 'label' needs a ground-truth class for every image; {len(missing)} have none "
            f"(e.g. {missing[:5]}). Give labels (ImageFolder folders, or 'path<TAB>label' lines) or use --target "
            "prediction"
        )
    return settings.target


def _versions() -> dict[str, str]:
    return {
        "finercam": finercam.__version__, "torch": torch.__version__, "python": platform.python_version(),
        "pillow": PIL.__version__, "safetensors": safetensors.__version__,
    }


def build_manifest(
    settings: RunSettings, source: DataSource, preprocess: Preprocess, target: str, model_info: Mapping[str, Any]
) -> dict[str, Any]:
    """The ``store.json`` of a run (before the first batch resolves the layer and the class count)."""
    method = get_method(settings.method)
    manifest = {
        "format": STORE_FORMAT, "version": STORE_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "chunk_size": settings.chunk_size,
        "config": {
            "model": dict(model_info), "layer": settings.layer, "method": method.name,
            "linear_in_gradient": bool(method.uses_gradients and method.linear_in_gradient),
            "aggregation": settings.aggregation, "gammas": [float(g) for g in settings.gammas],
            "references": settings.references, "num_references": settings.num_references, "target": target,
            "preprocess": asdict(preprocess), "preprocessing": preprocess.describe(), "amp": settings.amp,
        },
        "class_names": list(source.class_names) if source.class_names is not None else None,
        "data": {
            "kind": source.kind, "count": len(source.items), "fingerprint": source.fingerprint(),
            "label_source": source.label_source,
        },
        "source": {"location": str(source.location), "notes": list(source.notes)},
        "versions": _versions(),
    }
    return json.loads(json.dumps(manifest))


@dataclass
class _ChunkBuilder:
    """The rows of one chunk, gathered group by group on the CPU and ordered by listing position when written."""

    chunk: int
    groups: list[dict[str, Tensor]] = field(default_factory=list)
    skipped: dict[int, str] = field(default_factory=dict)

    def add(self, group: SizeGroup, result: SweepResult, labels: Tensor) -> None:
        index = torch.tensor(group.indices, dtype=torch.int64)
        input_size = torch.tensor(tuple(group.pixels.shape[-2:]), dtype=torch.int32)
        baseline = result.layer_baseline_raw_maps[0].detach().float().cpu()
        self.groups.append({
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
        })

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
            rows = [row for group in self.groups for row in group[name]]  # maps of different sizes stay separate
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
        self, model: nn.Module, settings: RunSettings, target: str, labels: Tensor,
        classifier_weights: ClassifierWeights | None,
    ) -> None:
        self.cam = FinerCAM(
            model, settings.layer, settings.method, classifier_weights=classifier_weights,
            score_batch_size=settings.score_batch_size,
        )
        self.settings = settings
        self.device = infer_device_dtype(model)[0]
        _autocast(settings.amp, self.device)  # fails early on the CPU
        self.use_labels = target == "label"
        self.labels = labels

    def autocast(self) -> contextlib.AbstractContextManager[object]:
        return _autocast(self.settings.amp, self.device)

    def explain(self, group: SizeGroup) -> SweepResult:
        pixels = group.pixels.to(self.device, non_blocking=True)
        targets = self.labels[group.indices].to(self.device) if self.use_labels else None
        settings = self.settings
        with self.autocast():
            return self.cam.sweep(
                pixels, settings.gammas, targets, settings.references, settings.num_references, settings.aggregation,
            )


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
        settings = explainer.settings
        with explainer.autocast():
            result = explainer.cam.sweep(
                decoded.pixels[None].to(explainer.device), settings.gammas, None, settings.references,
                settings.num_references, settings.aggregation,
            )
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
        InvalidArgumentError: bad settings, labels that do not fit the model, ``amp`` without CUDA.
        StoreError: ``out`` holds a store made with other settings or another listing.
    """
    settings = settings or RunSettings()
    settings.check()
    root = Path(out)
    target = _target_mode(settings, source)
    info = dict(model_info) if model_info is not None else {"class": type(model).__name__}
    labels = torch.tensor([-1 if item.label is None else item.label for item in source.items], dtype=torch.int64)
    explainer = _Explainer(model, settings, target, labels, classifier_weights)
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
    for note in source.notes:
        (log or (lambda _line: None))(f"note: {note}")

    batches = plan_batches(pending, settings.chunk_size, settings.batch_size, total)
    if batches:
        positions = (position for batch in batches for position in batch)
        writer.commit(_preflight(explainer, source, preprocess, positions, settings.max_pixels))
        _process(writer, explainer, source, preprocess, batches, settings, summary)
    else:
        writer.commit()
    _summarise(summary, root, source, mine, replace(settings, target=target))
    name = "summary.json" if count == 1 else f"summary-shard-{index}-of-{count}.json"
    write_json(root / name, summary.as_dict())
    return summary


def _process(
    writer: StoreWriter, explainer: _Explainer, source: DataSource, preprocess: Preprocess,
    batches: list[list[int]], settings: RunSettings, summary: RunSummary,
) -> None:
    """The loop: decoded batches in, chunks out."""
    total = len(source.items)
    remaining: dict[int, int] = {}
    for batch in batches:
        chunk = batch[0] // settings.chunk_size
        remaining[chunk] = remaining.get(chunk, 0) + 1
    workers = settings.num_workers if settings.num_workers is not None else default_workers(explainer.device)
    loader = batch_loader(
        ImageDataset(source.items, preprocess, settings.max_pixels), batches, settings.chunk_size,
        num_workers=workers, pin_memory=explainer.device.type == "cuda",
    )
    progress = Progress(sum(len(batch) for batch in batches), enabled=settings.progress)
    builder: _ChunkBuilder | None = None
    outputs = writer.manifest.get(RESOLVED) or {}
    metadata = {
        "batch_size": str(settings.batch_size), "device": str(explainer.device), "amp": settings.amp,
    }
    explained = 0
    batch: Batch
    for batch in loader:
        if builder is None or builder.chunk != batch.chunk:
            builder = _ChunkBuilder(batch.chunk)
        for group in batch.groups:
            builder.add(group, explainer.explain(group), explainer.labels)
        builder.skipped.update(batch.skipped)
        explained += len(batch.indices) - len(batch.skipped)
        progress.update(len(batch.indices), len(batch.skipped))
        remaining[batch.chunk] -= 1
        if remaining[batch.chunk] == 0:
            tensors = builder.tensors(outputs)
            positions = chunk_range(batch.chunk, settings.chunk_size, total)
            layers = list(outputs.get("layers") or [])
            records = builder.records(source, positions, set(tensors["index"].tolist()))
            writer.write_chunk(batch.chunk, tensors, {
                **metadata, "layers": json.dumps(layers), "records": json.dumps(records, ensure_ascii=False),
            })
            builder = None
    summary.processed = progress.done
    summary.explained = explained
    summary.skipped = progress.skipped
    summary.seconds = progress.elapsed
    summary.images_per_second = progress.rate
