"""From per-image results to tables: means with 95% bootstrap confidence intervals, written as JSON, CSV and Markdown.

Each row is one base method at one gamma (gamma 0 = the base CAM, the others Finer-CAM). Besides each metric's mean
and interval, ``delta`` is the paired difference to the same method's base CAM on the same images (bootstrap over
images), which is what "does Finer help" asks.
"""

from __future__ import annotations

import csv
import io
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from finercam.errors import InvalidArgumentError
from finercam.evaluation.scoring import gamma_key
from finercam.methods import METHODS
from finercam.metrics import DEFAULT_LEVEL, bootstrap, metric_info


@dataclass(frozen=True)
class Summary:
    """The aggregated results.

    Attributes:
        rows: one dict per method and gamma: ``method``, ``gamma``, ``finer``, ``n_images``,
            ``metrics[name] = {mean, low, high, n}`` and ``delta[name] = {mean, low, high, n}`` (vs gamma 0).
        curves: ``curves[method][gamma][mode] = {"fractions", "target", "reference"}``: mean deletion / insertion
            curves of ``p_c`` and ``p_d``.
        metric_names: the metric columns, in order. n_images: images aggregated. skipped: unreadable files.
        accuracy: top-1 accuracy of the evaluated images (``None`` without labels).
    """

    rows: list[dict[str, Any]]
    curves: dict[str, dict[str, dict[str, dict[str, list[float]]]]]
    metric_names: list[str]
    n_images: int
    skipped: list[dict[str, str]]
    accuracy: float | None
    level: float = DEFAULT_LEVEL


def summarize(
    records: Sequence[dict[str, Any]], methods: Sequence[str], gammas: Sequence[float], *, correct_only: bool = False,
    resamples: int = 2000, seed: int = 0,
) -> Summary:
    """Aggregate the batch records of :func:`~finercam.evaluation.runner.evaluate_dataset`.

    Images are taken in dataset order (their ``index``), whatever batches they were evaluated in, so that a resumed
    evaluation gives the same intervals as an uninterrupted one.
    """
    images = [image for record in records for image in record["images"]]
    twice = sorted(index for index, count in Counter(image.get("index") for image in images).items()
                   if index is not None and count > 1)
    if twice:
        raise InvalidArgumentError(
            f"the evaluation's records hold {len(twice)} image(s) twice (e.g. index {twice[0]}): two evaluations wrote "
            "to the same folder at once (finercam now refuses that). Rerun with --restart to evaluate them once"
        )
    order = _dataset_order(images)
    images = [images[i] for i in order]
    skipped = sorted((item for record in records for item in record["skipped"]), key=lambda item: item.get("index", 0))
    labelled = [image for image in images if image["correct"] is not None]
    accuracy = sum(image["correct"] for image in labelled) / len(labelled) if labelled else None
    if correct_only and len(labelled) < len(images):
        raise InvalidArgumentError("--correct-only needs a label for every image (an ImageFolder tree whose folder "
                                   "names are the model's class names)")
    keep = torch.tensor([bool(image["correct"]) or not correct_only for image in images], dtype=torch.bool)
    rows: list[dict[str, Any]] = []
    curves: dict[str, dict[str, dict[str, dict[str, list[float]]]]] = {}
    names: list[str] = []
    for method in methods:
        columns: dict[str, dict[str, list[float]]] = {}
        for gamma in gammas:
            key = gamma_key(gamma)
            merged: dict[str, list[float]] = {}
            for record in records:
                for name, values in record["values"].get(method, {}).get(key, {}).items():
                    merged.setdefault(name, []).extend(math.nan if v is None else v for v in values)
            columns[key] = {name: [values[i] for i in order] for name, values in merged.items()}
        names = names or [name for name in columns[gamma_key(gammas[0])] if name != "empty"]
        base = columns[gamma_key(0.0)]
        for gamma in gammas:
            key = gamma_key(gamma)
            estimates, deltas = [], []
            if names:
                table = torch.tensor([columns[key][name] for name in names], dtype=torch.float64).T[keep]
                reference = torch.tensor([base[name] for name in names], dtype=torch.float64).T[keep]
                estimates = bootstrap(table, resamples, seed=seed)
                deltas = bootstrap(table - reference, resamples, seed=seed)
            empty = torch.tensor(columns[key].get("empty", []), dtype=torch.float64)[keep]
            rows.append({
                "method": method, "method_title": METHODS[method].title if method in METHODS else method,
                "gamma": gamma, "finer": gamma > 0, "n_images": int(keep.sum()),
                "empty_maps": float(empty.mean()) if empty.numel() else 0.0,
                "metrics": {name: e.as_dict() for name, e in zip(names, estimates, strict=True)},
                "delta": {name: e.as_dict() for name, e in zip(names, deltas, strict=True)} if gamma > 0 else {},
            })
            curves.setdefault(method, {})[key] = _mean_curves(records, method, key, correct_only)
    return Summary(rows, curves, names, int(keep.sum()), skipped, accuracy)


def _dataset_order(images: Sequence[dict[str, Any]]) -> list[int]:
    """The positions of ``images`` sorted by their ``index`` in the dataset (records written before indices were
    recorded keep their order)."""
    if not all("index" in image for image in images):
        return list(range(len(images)))
    return sorted(range(len(images)), key=lambda i: images[i]["index"])


def strict_json(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by ``None``, so that it is valid JSON (``null``) for any
    parser, not Python's ``NaN`` extension."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: strict_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json(item) for item in value]
    return value


def _mean_curves(records: Sequence[dict[str, Any]], method: str, key: str, correct_only: bool) -> dict[str, Any]:
    subset = "correct" if correct_only else "all"
    count = sum(
        sum(1 for image in record["images"] if image["correct"] or not correct_only) for record in records
    )
    result: dict[str, dict[str, list[float]]] = {}
    fractions = next((record["fractions"] for record in records if "fractions" in record), None)
    for record in records:
        for mode, sums in record["curves"].get(method, {}).get(key, {}).items():
            total = torch.tensor(sums[subset], dtype=torch.float64)
            entry = result.setdefault(mode, {"sum": torch.zeros_like(total)})  # type: ignore[dict-item]
            entry["sum"] = entry["sum"] + total  # type: ignore[operator]
    for entry in result.values():
        # float32 probabilities: 7 decimals keep all they hold, and make the mean independent of the batching
        mean = (entry.pop("sum") / max(count, 1)).round(decimals=7)  # type: ignore[operator]
        entry.update({"fractions": fractions, "target": mean[:, 0].tolist(), "reference": mean[:, 1].tolist()})
    return result


def _cell(estimate: dict[str, Any], signed: bool = False) -> str:
    if estimate["n"] == 0 or estimate["mean"] != estimate["mean"]:
        return "n/a"
    fmt = "{:+.4f}" if signed else "{:.4f}"
    return f"{fmt.format(estimate['mean'])} [{fmt.format(estimate['low'])}, {fmt.format(estimate['high'])}]"


def _arrow(name: str) -> str:
    return "↑" if metric_info(name).higher_is_better else "↓"


def _label(row: dict[str, Any]) -> str:
    return f"Finer-{row['method_title']}" if row["finer"] else row["method_title"]


def markdown(summary: Summary, title: str = "finercam evaluate") -> str:
    """The results as Markdown: a table of means with 95% intervals, and one of the differences to the base CAM."""
    names = summary.metric_names
    lines = [f"## {title}", "",
             f"{summary.n_images} images; mean [95% bootstrap CI]; ↑ higher is better, ↓ lower is better.", ""]
    for name in (n for n in names if n in ("pointing", "energy") and summary.rows):
        counted = summary.rows[0]["metrics"][name]["n"]
        if counted < summary.n_images:
            lines[-1:-1] = [f"{name}: over {counted} of {summary.n_images} images (the others have no ground-truth "
                            "region)."]
    empty = [f"{_label(row)} γ {gamma_key(row['gamma'])} {row['empty_maps']:.1%}" for row in summary.rows
             if row.get("empty_maps", 0) > 0]
    if empty:
        lines[-1:-1] = [f"Empty maps (no positive evidence: they point nowhere, and remove pixels in an arbitrary "
                        f"order): {', '.join(empty)}."]
    lines += ["| method | gamma | " + " | ".join(f"{n} {_arrow(n)}" for n in names) + " |",
              "|---|---|" + "---|" * len(names)]
    for row in summary.rows:
        cells = [_cell(row["metrics"][n], n.startswith("rd@")) for n in names]
        lines.append(f"| {_label(row)} | {gamma_key(row['gamma'])} | " + " | ".join(cells) + " |")
    lines += ["", "Finer-CAM minus the base CAM on the same images (paired bootstrap):", "",
              "| method | gamma | " + " | ".join(f"Δ {n}" for n in names) + " |", "|---|---|" + "---|" * len(names)]
    for row in summary.rows:
        if row["finer"]:
            cells = [_cell(row["delta"][n], True) for n in names]
            lines.append(f"| {_label(row)} | {gamma_key(row['gamma'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _number(value: float) -> str:
    """A CSV cell: six decimals, or empty for a value that does not exist (no image had one)."""
    return f"{value:.6f}" if math.isfinite(value) else ""


def csv_text(summary: Summary) -> str:
    """One CSV line per method, gamma and metric: mean, interval, n, and the difference to the base CAM (empty
    cells where no image has a value)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["method", "gamma", "finer", "metric", "higher_is_better", "mean", "low", "high", "n",
                     "delta_mean", "delta_low", "delta_high", "empty_maps"])
    for row in summary.rows:
        for name in summary.metric_names:
            estimate, delta = row["metrics"][name], row["delta"].get(name)
            writer.writerow([
                row["method"], f"{gamma_key(row['gamma'])}", row["finer"], name, metric_info(name).higher_is_better,
                *(_number(estimate[k]) for k in ("mean", "low", "high")), estimate["n"],
                *((_number(delta[k]) for k in ("mean", "low", "high")) if delta else ("", "", "")),
                _number(row.get("empty_maps", 0.0)),
            ])
    return buffer.getvalue()
