"""``evaluate_dataset``: explain a dataset with several base methods and gammas and score every map, resumably.

Per batch: one :meth:`FinerCAM.sweep <finercam.explain.FinerCAM.sweep>` per method gives the base CAM (gamma 0) and
the Finer maps at every gamma; :func:`~finercam.evaluation.scoring.score_sweep` scores them. Finished batches are
appended to ``OUT/progress.jsonl`` (one JSON line per batch, flushed and fsynced, listing its images' indices), next to
``OUT/progress-config.json`` (the options); a rerun skips the images already done, also with other batch sizes, and
refuses to mix results of other options (:mod:`finercam.evaluation.resume`). A line cut short by a crash is discarded
on resume.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from finercam.errors import InvalidArgumentError
from finercam.evaluation.annotations import ImageItem, Regions
from finercam.evaluation.resume import PROGRESS, PROGRESS_CONFIG, comparable, exclusive, prepare_out, read_progress
from finercam.evaluation.scoring import LOCALIZATION, ScoreOptions, gamma_key, score_sweep
from finercam.explain import FinerCAM
from finercam.images import ImageReadError, load_image
from finercam.models.preprocess import Preprocess
from finercam.objectives import ClassifierWeights
from finercam.progress import Progress

__all__ = ["PROGRESS", "PROGRESS_CONFIG", "TARGETS", "EvaluationOptions", "evaluate_dataset", "read_progress"]
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
        batch_size: images per batch. score_batch_size: masked inputs per Score-CAM pass (neither changes the
            results, so a resumed evaluation may change them).
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
        """A short hash of the options that change per-image results (not the batch sizes; ``correct_only`` only
        filters)."""
        fields = comparable(asdict(self))
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
    note: Callable[[str], None] = lambda text: None
    """Says what the current batch is doing (:meth:`finercam.progress.Progress.note`)."""


def _collate(rows: list) -> list:
    return rows


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
    model_description: Mapping[str, Any] | None = None,
    classifier_weights: ClassifierWeights | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Evaluate ``items`` (image path, label or ``None``); return every finished batch's record (see
    :func:`read_progress`), resuming from ``out`` when it holds a partial run of the same options, data and model
    (the batch sizes may differ; the images left are batched with the new ones).

    Images that cannot be read are skipped and listed with their reason in the batch records; images without a
    region in ``regions`` are left out of the localization metrics (``None`` values). ``data_description`` and
    ``model_description`` (e.g. the model's spec and weights files, and under ``fingerprints`` their
    :func:`~finercam.fingerprint.model_fingerprints`) are recorded and must match on resume.
    ``classifier_weights`` (the linear head) is needed for ``references="weights"``. The regions'
    :meth:`~finercam.evaluation.annotations.Regions.identity` is recorded too when localization is scored. ``log``
    receives a line when the evaluation resumes. While it runs, ``out`` is locked: a second evaluation into it is
    refused.

    Raises:
        InvalidArgumentError: localization metrics without ``regions``, ``out`` holds an evaluation with other
            options, data, model or regions (each difference is named), or another evaluation is writing to it.
    """
    wanted = sorted(set(LOCALIZATION) & set(options.score.metrics))
    if wanted and regions is None:
        raise InvalidArgumentError(f"the metrics {wanted} need ground-truth regions (regions=load_regions(...))")
    if options.references == "weights" and classifier_weights is None:
        raise InvalidArgumentError("references='weights' needs classifier_weights: the linear head whose rows are "
                                   "the classes (e.g. model.fc)")
    out = Path(out)
    extra = {"data": data_description, "images": len(items), "model": dict(model_description or {}),
             "regions": regions.identity() if wanted and regions is not None else None}
    with exclusive(out):
        done = prepare_out(out, asdict(options), extra, restart, len(items), log)
        if done and log is not None:
            log(f"resuming the evaluation in {str(out)!r}: {len(done)} of {len(items)} images already done")
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        cams = {method: FinerCAM(model, options.layer or "auto", method, score_batch_size=options.score_batch_size,
                                 classifier_weights=classifier_weights)
                for method in options.methods}
        left = [i for i in range(len(items)) if i not in done]
        batches = [left[start : start + options.batch_size] for start in range(0, len(left), options.batch_size)]
        first = 1 + max((record["batch"] for record in read_progress(out)), default=-1)
        tracker = Progress(len(left), enabled=progress)  # the images left (all of them unless resuming)
        setting = _Setting(model, cams, options, preprocess, class_names, regions, device, tracker.note)
        loader = DataLoader(_Files([items[i] for i in left], preprocess), batch_size=options.batch_size,
                            shuffle=False, num_workers=workers, collate_fn=_collate)
        with (out / PROGRESS).open("a") as journal:
            for number, (indices, rows) in enumerate(zip(batches, _regrouped(loader, batches), strict=True), first):
                tracker.begin(f"batch {number - first + 1}/{len(batches)}")
                record = _evaluate_batch(setting, rows, [items[i] for i in indices], indices)
                record["batch"] = number
                journal.write(json.dumps(record) + "\n")
                journal.flush()
                os.fsync(journal.fileno())
                tracker.update(len(rows), skipped=len(record["skipped"]))
        return read_progress(out)


def _regrouped(loader: DataLoader, batches: list[list[int]]) -> Iterator[list]:
    """The loader's rows, one list per batch (the loader's batches are the same sizes)."""
    iterator = iter(loader)
    for batch in batches:
        rows = next(iterator)
        assert len(rows) == len(batch)
        yield rows


def _evaluate_batch(setting: _Setting, rows: list, sources: list[tuple[Path, int | None]],
                    indices: list[int]) -> dict[str, Any]:
    """One batch's record. Images of different input sizes (a preprocessing without a crop) are explained in groups
    of equal size; the record lists the images group after group, their values in the same order, each image with
    its ``index`` in the dataset (``indices``: those of every image of the batch, skipped ones included)."""
    skipped = [{"path": str(sources[k][0]), "reason": reason, "index": indices[k]}
               for k, (_, _, _, reason) in enumerate(rows) if reason]
    record: dict[str, Any] = {"indices": indices, "skipped": skipped, "images": [], "values": {}, "curves": {}}
    groups: dict[tuple[int, ...], list[int]] = {}
    for k, row in enumerate(rows):
        if row[3] is None:
            groups.setdefault(tuple(row[1].shape), []).append(k)
    for kept in groups.values():
        part = _evaluate_group(setting, rows, sources, kept)
        for image, k in zip(part["images"], kept, strict=True):
            image["index"] = indices[k]
        _merge(record, part)
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
        setting.note(f"{method} on {len(kept)} images")
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
            per_gamma[gamma_key(gamma)] = values
            curve_sums[gamma_key(gamma)] = {
                mode: {"all": curve.cpu().double().sum(dim=0).tolist(),
                       "correct": curve.cpu().double()[correct].sum(dim=0).tolist()}
                for mode, curve in scores.curves[g].items()  # float64 sums: the same whatever the batches
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
