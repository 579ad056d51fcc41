"""Figures of an evaluation: deletion / insertion curves of ``p_c`` and ``p_d``, and every metric against gamma."""

from __future__ import annotations

from pathlib import Path

from finercam.evaluation.summary import Summary
from finercam.metrics import metric_info
from finercam.viz import colormap, figure


def curves_figure(summary: Summary, path: Path) -> Path | None:
    """Mean deletion and insertion curves per method: the target ``p_c`` (solid) and the most similar reference
    ``p_d`` (dashed) for the base CAM and each Finer gamma (the paper's Fig. 5). ``None`` without curves."""
    modes = sorted({mode for per_gamma in summary.curves.values() for c in per_gamma.values() for mode in c})
    if not modes:
        return None
    methods = list(summary.curves)
    with figure(figsize=(4.2 * len(methods), 3.4 * len(modes))) as drawing:
        axes = drawing.subplots(len(modes), len(methods), squeeze=False)
        for column, method in enumerate(methods):
            gammas = list(summary.curves[method])
            colours = colormap("viridis")([i / max(len(gammas) - 1, 1) for i in range(len(gammas))])
            for row, mode in enumerate(modes):
                axis = axes[row][column]
                for colour, gamma in zip(colours, gammas, strict=True):
                    curve = summary.curves[method][gamma].get(mode)
                    if not curve:
                        continue
                    label = "base" if float(gamma) == 0 else f"Finer γ={gamma}"
                    axis.plot(curve["fractions"], curve["target"], color=colour, label=f"{label} p_c")
                    axis.plot(curve["fractions"], curve["reference"], color=colour, linestyle="--")
                axis.set_title(f"{method}: {mode}")
                axis.set_xlabel("fraction of pixels " + ("removed" if mode == "deletion" else "inserted"))
                axis.set_ylabel("probability (solid p_c, dashed p_d)")
                axis.grid(alpha=0.3)
        axes[0][0].legend(fontsize=7)
        drawing.tight_layout()
        drawing.savefig(path, dpi=110)
    return path


def gamma_figure(summary: Summary, path: Path) -> Path | None:
    """One panel per metric: its mean and 95% interval against gamma, one line per method."""
    names = summary.metric_names
    if not names:
        return None
    columns = min(4, len(names))
    rows = (len(names) + columns - 1) // columns
    methods = list(dict.fromkeys(row["method"] for row in summary.rows))
    with figure(figsize=(3.8 * columns, 3.0 * rows)) as drawing:
        axes = drawing.subplots(rows, columns, squeeze=False)
        for index, name in enumerate(names):
            axis = axes[index // columns][index % columns]
            for method in methods:
                points = [row for row in summary.rows if row["method"] == method]
                gammas = [row["gamma"] for row in points]
                means = [row["metrics"][name]["mean"] for row in points]
                lows = [row["metrics"][name]["low"] for row in points]
                highs = [row["metrics"][name]["high"] for row in points]
                axis.plot(gammas, means, marker="o", label=method)
                axis.fill_between(gammas, lows, highs, alpha=0.2)
            arrow = "higher" if metric_info(name).higher_is_better else "lower"
            axis.set_title(f"{name} ({arrow} is better)", fontsize=9)
            axis.set_xlabel("gamma (0 = base CAM)")
            axis.grid(alpha=0.3)
        for index in range(len(names), rows * columns):
            axes[index // columns][index % columns].axis("off")
        axes[0][0].legend(fontsize=7)
        drawing.tight_layout()
        drawing.savefig(path, dpi=110)
    return path
