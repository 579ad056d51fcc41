"""From per-image results to tables: means with 95% bootstrap confidence intervals, written as JSON, CSV and Markdown.

Each row is one base method at one gamma (gamma 0 = the base CAM, the others Finer-CAM). Besides each metric's mean
and interval, ``delta`` is the paired difference to the same method's base CAM on the same images (bootstrap over
images), which is what "does Finer help" asks.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from finercam.errors import InvalidArgumentError
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
    """Aggregate the batch records of :func:`~finercam.evaluation.runner.evaluate_dataset`."""
    images = [image for record in records for image in record["images"]]
    skipped = [item for record in records for item in record["skipped"]]
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
            key = f"{gamma:g}"
            merged: dict[str, list[float]] = {}
            for record in records:
                for name, values in record["values"].get(method, {}).get(key, {}).items():
                    merged.setdefault(name, []).extend(math.nan if v is None else v for v in values)
            columns[key] = merged
        names = names or [name for name in columns[f"{gammas[0]:g}"] if name != "empty"]
        base = columns[f"{0.0:g}"]
        for gamma in gammas:
            key = f"{gamma:g}"
            table = torch.tensor([columns[key][name] for name in names], dtype=torch.float64).T[keep]
            reference = torch.tensor([base[name] for name in names], dtype=torch.float64).T[keep]
            estimates = bootstrap(table, resamples, seed=seed) if names else []
            deltas = bootstrap(table - reference, resamples, seed=seed) if names else []
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
        mean = entry.pop("sum") / max(count, 1)  # type: ignore[operator]
        entry.update({"fractions": fractions, "target": mean[:, 0].tolist(), "reference": mean[:, 1].tolist()})
    return result


def _cell(estimate: dict[str, Any], signed: bool = False) -> str:
    if estimate["n"] == 0 or estimate["mean"] != estimate["mean"]:
        return "n/a"
    fmt = "{:+.4f}" if signed else "{:.4f}"
    return f"{fmt.format(estimate['mean'])} [{fmt.format(estimate['low'])}, {fmt.format(estimate['high'])}]"


def _arrow(name: str) -> str:
    return "↑" if metric_info(name).higher_is_better else "↓"


def markdown(summary: Summary, title: str = "finercam evaluate") -> str:
    """The results as Markdown: a table of means with 95% intervals, and one of the differences to the base CAM."""
    names = summary.metric_names
    lines = [f"## {title}", "",
             f"{summary.n_images} images; mean [95% bootstrap CI]; ↑ higher is better, ↓ lower is better.", ""]
    lines += ["| method | gamma | " + " | ".join(f"{n} {_arrow(n)}" for n in names) + " |",
              "|---|---|" + "---|" * len(names)]
    for row in summary.rows:
        cells = [_cell(row["metrics"][n], n.startswith("rd@")) for n in names]
        label = f"Finer-{row['method_title']}" if row["finer"] else row["method_title"]
        lines.append(f"| {label} | {row['gamma']:g} | " + " | ".join(cells) + " |")
    lines += ["", "Finer-CAM minus the base CAM on the same images (paired bootstrap):", "",
              "| method | gamma | " + " | ".join(f"Δ {n}" for n in names) + " |", "|---|---|" + "---|" * len(names)]
    for row in summary.rows:
        if row["finer"]:
            cells = [_cell(row["delta"][n], True) for n in names]
            lines.append(f"| Finer-{row['method_title']} | {row['gamma']:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def csv_text(summary: Summary) -> str:
    """One CSV line per method, gamma and metric: mean, interval, n, and the difference to the base CAM."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["method", "gamma", "finer", "metric", "higher_is_better", "mean", "low", "high", "n",
                     "delta_mean", "delta_low", "delta_high"])
    for row in summary.rows:
        for name in summary.metric_names:
            estimate, delta = row["metrics"][name], row["delta"].get(name)
            writer.writerow([
                row["method"], f"{row['gamma']:g}", row["finer"], name, metric_info(name).higher_is_better,
                *(f"{estimate[k]:.6f}" for k in ("mean", "low", "high")), estimate["n"],
                *((f"{delta[k]:.6f}" for k in ("mean", "low", "high")) if delta else ("", "", "")),
            ])
    return buffer.getvalue()
