"""``evaluate_dataset``: explain a dataset with several base methods and gammas and score every map, resumably.

Per batch: one :meth:`FinerCAM.sweep <finercam.explain.FinerCAM.sweep>` per method gives the base CAM (gamma 0) and
the Finer maps at every gamma; :func:`~finercam.evaluation.scoring.score_sweep` scores them. Finished batches are
appended to ``OUT/progress.jsonl`` (one JSON line per batch, flushed and fsynced), next to ``OUT/progress-config.json``
(the options); a rerun with the same options skips them, a rerun with other options refuses to mix the two. A line cut
short by a crash is discarded on resume.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from finercam.errors import InvalidArgumentError
from finercam.evaluation.annotations import ImageItem, Regions
from finercam.evaluation.scoring import ScoreOptions, score_sweep
from finercam.explain import FinerCAM
from finercam.images import ImageReadError, load_image
from finercam.models.preprocess import Preprocess
from finercam.progress import Progress

PROGRESS, PROGRESS_CONFIG = "progress.jsonl", "progress-config.json"
TARGETS = ("prediction", "label")


@dataclass(frozen=True)
class EvaluationOptions:
    """What ``evaluate_dataset`` computes (every field is recorded with the results).

    Attributes:
        methods: base CAM methods. gammas: comparison strengths (0 = the base CAM; added when missing).
        target: ``"prediction"`` (explain the top class, the paper's protocol) or ``"label"`` (the true class).
        references, num_references, aggregation: the reference strategy, ``T`` and the aggregation of the refs.
        layer: the target layer (``None``: the model's recommended layer, else auto).
        score: the metric options. correct_only: aggregate only correctly classified images.
        batch_size: images per batch. score_batch_size: masked inputs per Score-CAM pass.
    """

    methods: tuple[str, ...] = ("gradcam",)
    gammas: tuple[float, ...] = (0.0, 0.3, 0.6, 1.0, 2.0)
    target: str = "prediction"
    references: str = "nearest"
    num_references: int = 3
    aggregation: str = "mean"
    layer: str | None = None
    score: ScoreOptions = field(default_factory=ScoreOptions)
    correct_only: bool = False
    batch_size: int = 32
    score_batch_size: int = 256

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise InvalidArgumentError(f"target must be one of {list(TARGETS)}; got {self.target!r}")
        gammas = tuple(sorted({0.0, *(float(g) for g in self.gammas)}))
        if any(not g >= 0 or g == float("inf") for g in gammas):
            raise InvalidArgumentError(f"gammas must be finite numbers >= 0; got {list(self.gammas)}")
        object.__setattr__(self, "gammas", gammas)

    def fingerprint(self) -> str:
        """A short hash of the options that change per-image results (``correct_only`` only filters)."""
        fields = {k: v for k, v in asdict(self).items() if k != "correct_only"}
        return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


class _Files(Dataset):
    """Decodes and preprocesses one image; an unreadable file yields its reason instead."""

    def __init__(self, items: Sequence[tuple[Path, int | None]], preprocess: Preprocess) -> None:
        self.items, self.preprocess = items, preprocess

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[int, Tensor | None, tuple[int, int], str | None]:
        path = self.items[index][0]
        try:
            image = load_image(path)
        except ImageReadError as error:
            return index, None, (0, 0), str(error)
        return index, self.preprocess(image), image.size, None


@dataclass(frozen=True)
class _Setting:
    """What every batch of one evaluation shares."""

    model: torch.nn.Module
    cams: dict[str, FinerCAM]
    options: EvaluationOptions
    preprocess: Preprocess
    class_names: Sequence[str] | None
    regions: Regions | None
    device: torch.device


def _collate(rows: list) -> list:
    return rows


def _prepare_out(out: Path, options: EvaluationOptions, extra: dict[str, Any], restart: bool) -> set[int]:
    """Create ``out``, check or write the options, and return the batches already finished."""
    out.mkdir(parents=True, exist_ok=True)
    config_path, progress_path = out / PROGRESS_CONFIG, out / PROGRESS
    record = {"fingerprint": options.fingerprint(), "options": asdict(options), **extra}
    if restart:
        progress_path.unlink(missing_ok=True)
    elif config_path.is_file() and progress_path.is_file():
        previous = json.loads(config_path.read_text())
        if previous.get("fingerprint") != record["fingerprint"] or previous.get("data") != record.get("data"):
            raise InvalidArgumentError(
                f"{out} holds a partial evaluation with other options or data; pass --restart to discard it, or "
                "choose another --out"
            )
    tmp = config_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str))
    os.replace(tmp, config_path)
    return {line["batch"] for line in read_progress(out)}


def read_progress(out: Path) -> list[dict[str, Any]]:
    """The finished batches in ``out/progress.jsonl``; a last line cut short by a crash is dropped (and truncated
    away so that appending goes on cleanly)."""
    path = out / PROGRESS
    if not path.is_file():
        return []
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) != len(data):
        with path.open("r+b") as handle:
            handle.truncate(len(complete))
    return [json.loads(line) for line in complete.decode().splitlines() if line.strip()]


def _gamma_key(gamma: float) -> str:
    return f"{gamma:g}"


def evaluate_dataset(
    model: torch.nn.Module,
    preprocess: Preprocess,
    items: Sequence[tuple[Path, int | None]],
    out: str | Path,
    options: EvaluationOptions,
    *,
    class_names: Sequence[str] | None = None,
    regions: Regions | None = None,
    workers: int = 0,
    restart: bool = False,
    data_description: str = "",
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Evaluate ``items`` (image path, label or ``None``); return every finished batch's record (see
    :func:`read_progress`), resuming from ``out`` when it holds a partial run of the same options and data.

    Images that cannot be read are skipped and listed with their reason in the batch records.
    """
    out = Path(out)
    done = _prepare_out(out, options, {"data": data_description, "images": len(items)}, restart)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    cams = {method: FinerCAM(model, options.layer or "auto", method, score_batch_size=options.score_batch_size)
            for method in options.methods}
    setting = _Setting(model, cams, options, preprocess, class_names, regions, device)
    batches = [list(range(start, min(start + options.batch_size, len(items))))
               for start in range(0, len(items), options.batch_size)]
    todo = [b for b in range(len(batches)) if b not in done]
    subset = [i for b in todo for i in batches[b]]
    tracker = Progress(len(subset), enabled=progress)  # the images left (all of them unless resuming)
    loader = DataLoader(_Files([items[i] for i in subset], preprocess), batch_size=options.batch_size,
                        shuffle=False, num_workers=workers, collate_fn=_collate)
    position = 0
    with (out / PROGRESS).open("a") as log:
        for batch_number, rows in zip(todo, _regrouped(loader, [len(batches[b]) for b in todo]), strict=True):
            record = _evaluate_batch(setting, rows, [items[subset[position + k]] for k in range(len(rows))])
            record["batch"] = batch_number
            position += len(rows)
            log.write(json.dumps(record) + "\n")
            log.flush()
            os.fsync(log.fileno())
            tracker.update(len(rows), skipped=len(record["skipped"]))
    return read_progress(out)


def _regrouped(loader: DataLoader, sizes: list[int]):
    """The loader's rows regrouped into the batches of ``sizes`` (the loader's batches are the same sizes)."""
    iterator = iter(loader)
    for size in sizes:
        rows = next(iterator)
        assert len(rows) == size
        yield rows


def _evaluate_batch(setting: _Setting, rows: list, sources: list[tuple[Path, int | None]]) -> dict[str, Any]:
    """One batch's record. Images of different input sizes (a preprocessing without a crop) are explained in groups
    of equal size; the record lists the images group after group, their values in the same order."""
    skipped = [{"path": str(sources[k][0]), "reason": reason} for k, (_, _, _, reason) in enumerate(rows) if reason]
    record: dict[str, Any] = {"skipped": skipped, "images": [], "values": {}, "curves": {}}
    groups: dict[tuple[int, ...], list[int]] = {}
    for k, row in enumerate(rows):
        if row[3] is None:
            groups.setdefault(tuple(row[1].shape), []).append(k)
    for kept in groups.values():
        _merge(record, _evaluate_group(setting, rows, sources, kept))
    return record


def _merge(record: dict[str, Any], part: dict[str, Any]) -> None:
    """Append a group's images and values to ``record`` and add its curve sums."""
    record["images"] += part["images"]
    if "fractions" in part:
        record["fractions"] = part["fractions"]
    for method, per_gamma in part["values"].items():
        for gamma, values in per_gamma.items():
            target = record["values"].setdefault(method, {}).setdefault(gamma, {})
            for name, column in values.items():
                target.setdefault(name, []).extend(column)
    for method, per_gamma in part["curves"].items():
        for gamma, modes in per_gamma.items():
            target = record["curves"].setdefault(method, {}).setdefault(gamma, {})
            for mode, sums in modes.items():
                if mode not in target:
                    target[mode] = sums
                else:
                    target[mode] = {key: (torch.tensor(target[mode][key]) + torch.tensor(value)).tolist()
                                    for key, value in sums.items()}


def _evaluate_group(
    setting: _Setting, rows: list, sources: list[tuple[Path, int | None]], kept: list[int]
) -> dict[str, Any]:
    """The record of the images ``kept`` (indices into ``rows``), all of one input size."""
    model, options, preprocess, device = setting.model, setting.options, setting.preprocess, setting.device
    record: dict[str, Any] = {"images": [], "values": {}, "curves": {}}
    images = torch.stack([rows[k][1] for k in kept]).to(device)
    labels = [sources[k][1] for k in kept]
    items = [ImageItem(sources[k][0], rows[k][2][0], rows[k][2][1], sources[k][1]) for k in kept]
    targets = None
    if options.target == "label":
        if any(label is None for label in labels):
            raise InvalidArgumentError("--target label needs a label for every image (an ImageFolder tree)")
        targets = torch.tensor(labels, device=device)
    first_sweep = None
    for method, cam in setting.cams.items():
        sweep = cam.sweep(images, options.gammas, targets, options.references, options.num_references,
                          options.aggregation)
        first_sweep = sweep if first_sweep is None else first_sweep
        masks = valid = None
        if setting.regions is not None and {"pointing", "energy"} & set(options.score.metrics):
            masks, valid = setting.regions.masks(items, preprocess, tuple(images.shape[-2:]), sweep.targets.cpu(),
                                                 sweep.references[:, 0].cpu(), setting.class_names)
            masks = masks.to(device)
        scores = score_sweep(model, images, sweep, options.score, masks)
        correct = torch.tensor([label is not None and label == p for label, p in
                                zip(labels, sweep.logits.argmax(dim=1).tolist(), strict=True)])
        per_gamma: dict[str, dict[str, list[float]]] = {}
        curve_sums: dict[str, dict[str, Any]] = {}
        for g, gamma in enumerate(options.gammas):
            values = {}
            for name, value in scores.values[g].items():
                value = value.float().cpu()
                if name in ("pointing", "energy") and valid is not None:
                    value = torch.where(valid, value, torch.full_like(value, float("nan")))
                values[name] = [round(float(v), 6) if v == v else None for v in value]
            values["empty"] = [float(v) for v in scores.empty[g].float().cpu()]
            per_gamma[_gamma_key(gamma)] = values
            curve_sums[_gamma_key(gamma)] = {
                mode: {"all": curve.cpu().sum(dim=0).tolist(), "correct": curve.cpu()[correct].sum(dim=0).tolist()}
                for mode, curve in scores.curves[g].items()
            }
        record["values"][method] = per_gamma
        record["curves"][method] = curve_sums
        if scores.fractions is not None:
            record["fractions"] = scores.fractions.tolist()
    assert first_sweep is not None
    predictions = first_sweep.logits.argmax(dim=1).cpu().tolist()
    probabilities = first_sweep.probabilities.cpu()
    for j, k in enumerate(kept):
        c, d = int(first_sweep.targets[j]), int(first_sweep.references[j, 0])
        record["images"].append({
            "path": str(sources[k][0]), "label": labels[j], "prediction": predictions[j], "target": c,
            "reference": d if d >= 0 else None, "p_target": round(float(probabilities[j, c]), 6),
            "p_reference": round(float(probabilities[j, d]), 6) if d >= 0 else None,
            "correct": None if labels[j] is None else labels[j] == predictions[j],
        })
    return record
