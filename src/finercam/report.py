"""The self-contained ``report.html`` of ``finercam demo``: tables, a localization-against-gamma plot and sample
explanations, with every figure embedded as a base64 PNG (no external assets, no network)."""

from __future__ import annotations

import argparse
import base64
import html
import io
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from finercam import synth, viz
from finercam.methods import METHODS
from finercam.metrics import METRICS, rd_name

if TYPE_CHECKING:
    from finercam.demo import ModelRun

PAPER_GAMMA = 0.6
SAMPLE_GAMMAS = (0.6, 2.0)
SHOWN = 6
STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1180px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em}h2{margin-top:1.8em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}th{background:#f3f3f3}
td.l,th.l{text-align:left}tr.paper td{background:#fff7d6}tr.base td{background:#eef4ff}
img{max-width:100%;height:auto;border:1px solid #eee}code{background:#f5f5f5;padding:0 .2em}
.note{color:#555;font-size:.92em}
"""


def _png(figure: Any, dpi: int) -> bytes:
    """A finished matplotlib figure as PNG bytes."""
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def _png_base64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _img(data: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{_png_base64(data)}">'


def _short(name: str) -> str:
    """``03-finch-black_beak-white_wingbar`` -> ``03 finch black beak, white wingbar``."""
    number, genus, *values = name.split("-")
    return f"{number} {genus} " + ", ".join(v.replace("_", " ") for v in values) if values else name


def gamma_plot(runs: Sequence[ModelRun], ks: Sequence[float]) -> bytes:
    """A PNG: pointing, energy and RD@k against gamma, one row per model, one line per method."""
    metrics = ["pointing", "energy", *(rd_name(k) for k in ks)]
    with viz.figure(figsize=(3.3 * len(metrics), 2.7 * len(runs) + 0.4)) as figure:
        axes = figure.subplots(len(runs), len(metrics), squeeze=False)
        for row, run in enumerate(runs):
            for column, metric in enumerate(metrics):
                axis = axes[row, column]
                for index, method in enumerate(dict.fromkeys(r["method"] for r in run.records)):
                    for aggregation in dict.fromkeys(r["aggregation"] for r in run.records):
                        points = sorted((r["gamma"], r[metric]) for r in run.records
                                        if r["method"] == method and r["aggregation"] == aggregation)
                        axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", color=f"C{index}",
                                  linestyle="-" if aggregation == "mean" else "--",
                                  label=f"{METHODS[method].title} ({aggregation})")
                axis.axvline(PAPER_GAMMA, color="#bbb", linestyle="--", linewidth=1)
                axis.set_title(f"{run.spec.name}: {metric}", fontsize=9)
                axis.set_xlabel("gamma (0 = base CAM)", fontsize=8)
                axis.tick_params(labelsize=7)
                axis.grid(alpha=0.3)
                if row == 0 and column == 0:
                    axis.legend(fontsize=7)
        return _png(figure, dpi=100)


def sample_indices(run: ModelRun, count: int = SHOWN) -> list[int]:
    """Correctly classified images whose first reference is a sibling species (a small difference mask), taken
    round-robin over classes; other images fill up if there are too few."""
    assert run.predictions is not None and run.references is not None
    labels, first = run.test.labels, run.references[:, 0]
    genus_of = torch.tensor([species.genus_index for species in synth.species_of(run.test.config)])
    good = (run.predictions == labels) & (first >= 0) & (genus_of[first.clamp(min=0)] == genus_of[labels])
    per_class = [(good & (labels == c)).nonzero().flatten().tolist() for c in range(len(run.spec.class_names))]
    chosen: list[int] = []
    for rank in range(max((len(p) for p in per_class), default=0)):
        chosen += [p[rank] for p in per_class if rank < len(p)]
    rest = [i for i in range(len(labels)) if i not in set(chosen)]
    return (chosen + rest)[:count]


def _exemplars(run: ModelRun, indices: list[int]) -> tuple[Tensor, list[str]]:
    """The first reference class of each shown image: the same individual rendered as that class when it is a
    sibling species, else a test image of that class (else a blank)."""
    assert run.references is not None
    test, pictures, notes = run.test, [], []
    for index in indices:
        reference = int(run.references[index, 0])
        species = synth.species_of(test.config)
        if reference >= 0 and test.individuals is not None and \
                species[reference].genus_index == int(test.genus[index]):
            image, _ = synth.render(test.individuals[torch.tensor([index])], reference, test.config)
            pictures.append(image[0])
            notes.append("same bird")
        else:
            others = (test.labels == reference).nonzero().flatten()
            pictures.append(test.images[int(others[0])] if len(others) else torch.ones_like(test.images[index]))
            notes.append("a test image" if len(others) else "no exemplar")
    return torch.stack(pictures), notes


def _grid(panels: list[list[dict[str, Any]]], headers: Sequence[str]) -> bytes:
    """A PNG grid: ``panels[row][column]`` has ``image`` (3, H, W), optional ``map`` (H, W) in [0, 1] overlaid with
    its peak marked, optional ``outline`` (H, W) bool drawn in white, and a ``caption``."""
    from finercam import viz

    rows, cols = len(panels), len(headers)
    with viz.figure(figsize=(2.05 * cols, 2.35 * rows + 0.3)) as figure:
        axes = figure.subplots(rows, cols, squeeze=False)
        for row, line in enumerate(panels):
            for column, panel in enumerate(line):
                axis = axes[row, column]
                cam = panel.get("map")
                picture = viz.overlay(panel["image"], cam) if cam is not None else \
                    panel["image"].permute(1, 2, 0).clamp(0, 1).numpy()
                axis.imshow(picture, interpolation="nearest")
                outline = panel.get("outline")
                if outline is not None and bool(outline.any()):
                    axis.contour(outline.float().numpy(), levels=[0.5], colors="white", linewidths=1.2)
                if cam is not None:
                    y, x = divmod(int(torch.argmax(cam)), cam.shape[-1])
                    axis.plot(x, y, marker="x", color="white", markersize=7, markeredgewidth=2)
                header = f"{headers[column]}\n" if row == 0 else ""
                axis.set_title(header + panel.get("caption", ""), fontsize=7)
                axis.set_xticks([])
                axis.set_yticks([])
        return _png(figure, dpi=85)


def samples_figure(run: ModelRun, gammas: Sequence[float]) -> bytes | None:
    """A PNG of sample rows: image, exemplar of the most similar class, Grad-CAM, Finer-CAM at
    :data:`SAMPLE_GAMMAS`, outlined difference mask. ``None`` without a Grad-CAM run."""
    if not run.gradcam_maps or run.predictions is None or run.references is None or run.differences is None:
        return None
    assert run.probabilities is not None
    gammas = list(gammas)
    shown = [(a, g) for a in run.gradcam_maps for g in SAMPLE_GAMMAS if g in gammas]
    base_maps = next(iter(run.gradcam_maps.values()))
    indices = sample_indices(run)
    exemplars, notes = _exemplars(run, indices)
    headers = ["image", "most similar class", *(["Grad-CAM (baseline)"] if 0.0 in gammas else []),
               *(f"Finer-Grad-CAM γ={g:g} ({a})" for a, g in shown), "difference mask"]
    panels = []
    for row, index in enumerate(indices):
        image = run.test.images[index]
        target, reference = int(run.predictions[index]), int(run.references[index, 0])
        truth = int(run.test.labels[index])
        parts = synth.differing_parts(run.test.config, target, reference)
        line: list[dict[str, Any]] = [
            {"image": image, "caption": f"true {truth:02d}, pred {target:02d}\n"
                                        f"p={float(run.probabilities[index, target]):.2f}"},
            {"image": exemplars[row], "caption": f"{reference:02d} ({notes[row]})"},
        ]
        if 0.0 in gammas:
            line.append({"image": image, "map": base_maps[gammas.index(0.0), index],
                         "caption": f"explains {target:02d}"})
        others = int((run.references[index] >= 0).sum()) - 1
        versus = f"{target:02d} vs {reference:02d}" + (f" (+{others} more)" if others > 0 else "")
        line += [{"image": image, "map": run.gradcam_maps[a][gammas.index(g), index], "caption": versus}
                 for a, g in shown]
        line.append({"image": image, "outline": run.differences[index],
                     "caption": " + ".join(parts) if len(parts) < len(synth.PARTS) else "other genus: whole bird"})
        panels.append(line)
    return _grid(panels, headers)


def _table(records: Sequence[dict[str, Any]], ks: Sequence[float]) -> str:
    metrics = ["pointing", "energy", *(rd_name(k) for k in ks)]
    arrows = {m: "↑" if METRICS[m].higher_is_better else "↓" for m in metrics if m in METRICS}
    head = "".join(f"<th>{html.escape(m)} {arrows.get(m, '')}</th>" for m in metrics)
    rows = []
    for r in records:
        kind = "base" if not r["finer"] else "paper" if r["gamma"] == PAPER_GAMMA else ""
        cells = "".join(f"<td>{r[m]:.3f}</td>" if m in ("pointing", "energy") else f"<td>{r[m]:+.4f}</td>"
                        for m in metrics)
        label = "base CAM" if not r["finer"] else "Finer-CAM"
        rows.append(f'<tr class="{kind}"><td class="l">{html.escape(r["model"])}</td>'
                    f'<td class="l">{html.escape(r["method_title"])}</td>'
                    f'<td class="l">{html.escape(r["aggregation"])}</td><td>{r["gamma"]:g}</td>'
                    f'<td class="l">{label}</td>{cells}<td>{r.get("empty_maps", 0):.1%}</td>'
                    f'<td>{r["n_images"]}</td></tr>')
    return (f'<table><tr><th class="l">model</th><th class="l">method</th><th class="l">aggregation</th><th>γ</th>'
            f'<th class="l">map</th>{head}'
            f"<th>all-zero maps</th><th>images</th></tr>{''.join(rows)}</table>")


def headline_pairs(
    records: Sequence[dict[str, Any]], gamma: float = PAPER_GAMMA
) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """``(base, finer)`` record pairs: per model, method and aggregation, gamma 0 against ``gamma``."""
    pairs = []
    for base in (r for r in records if r["gamma"] == 0):
        finer = next((r for r in records if r["gamma"] == gamma and all(
            r[key] == base[key] for key in ("model", "method", "aggregation"))), None)
        if finer is not None:
            pairs.append((base, finer))
    return pairs


def pointing_ratio(base: dict[str, Any], finer: dict[str, Any]) -> float:
    """Finer's pointing hit rate over the base CAM's (``inf`` when the base never hits)."""
    return finer["pointing"] / base["pointing"] if base["pointing"] else float("inf")


def _headline(runs: Sequence[ModelRun], ks: Sequence[float]) -> str:
    """Base CAM against Finer-CAM at the paper's gamma, per model, method and aggregation."""
    first_k = rd_name(ks[0])
    rows = [
        f'<tr><td class="l">{html.escape(base["model"])}</td><td class="l">{METHODS[base["method"]].title}</td>'
        f'<td class="l">{html.escape(base["aggregation"])}</td>'
        f"<td>{base['pointing']:.3f} → {finer['pointing']:.3f}</td><td>×{pointing_ratio(base, finer):.2f}</td>"
        f"<td>{base['energy']:.3f} → {finer['energy']:.3f}</td>"
        f"<td>{base[first_k]:+.4f} → {finer[first_k]:+.4f}</td></tr>"
        for base, finer in headline_pairs([r for run in runs for r in run.records])
    ]
    return ('<table><tr><th class="l">model</th><th class="l">method</th><th class="l">aggregation</th>'
            f"<th>pointing</th><th>ratio</th><th>energy</th><th>{first_k}</th></tr>{''.join(rows)}</table>")


def _protocol(runs: Sequence[ModelRun], args: argparse.Namespace) -> str:
    ks = ", ".join(f"{100 * k:g}%" for k in args.ks)
    config = runs[0].test.config
    models = "".join(
        f"<li><code>{html.escape(run.spec.name)}</code>: accuracy on this test set {run.accuracy:.1%}; target layer "
        f"<code>{html.escape(str(getattr(run.spec.target_layer, 'name', run.spec.target_layer)))}</code>; "
        f"card: <code>{html.escape(_card_summary(run.spec.card))}</code>; time "
        + ", ".join(f"{METHODS[key.split('/')[0]].title} ({key.split('/')[-1]}) {s:.1f} s"
                    for key, s in run.seconds.items()) + "</li>"
        for run in runs
    )
    return f"""
<p>The test set is {len(runs[0].test)} images of the synthetic fine-grained benchmark
(the test split of <code>finercam synth --seed {args.seed} --species {config.species_per_genus}</code>, quantised to
8 bits): {config.num_classes} species in {config.num_genera} genera; the species of a genus differ only in the colour
of small parts, and each has look-alikes that differ from it in a single part. The seed is chosen so that it is none
of the models' training or test seeds.</p>
<ul>{models}</ul>
<p><b>Explanations.</b> For every image the explained class <i>c</i> is the model's prediction (also when it is wrong;
the accuracy above says how often), and the references are its {NUM_REFS} nearest classes (closest logits). Finer-CAM
explains <i>y<sub>c</sub> − γ · agg<sub>t</sub> y<sub>d<sub>t</sub></sub></i> with the paper's mean or the official
library's probability-weighted (softmax) aggregation; γ = 0 is the base CAM itself, the paper's setting is γ = 0.6.
All gammas of a method come from one forward pass (<code>FinerCAM.sweep</code>).</p>
<p><b>The difference mask</b> of an image is the set of visible pixels of the parts whose appearance differs between
<i>c</i> and its first (most similar) reference <i>d</i>. Within a genus those are the small parts that tell the two
species apart; when <i>d</i> is of another genus, it is the whole visible bird.</p>
<ul>
<li><b>pointing</b> (↑): the share of images whose map peak (at input resolution) lies inside the difference mask
grown by {args.tolerance} px.</li>
<li><b>energy</b> (↑): the share of the map's total mass inside the difference mask.</li>
<li><b>RD@k</b> (↑, k = {ks}; the paper's headline metric): the top k of the map's pixels are replaced by the
model's mean pixel (zero after its normalisation), and RD = (p<sub>c</sub> − p*<sub>c</sub>) −
(p<sub>d</sub> − p*<sub>d</sub>) with softmax probabilities before (p) and after (p*) masking. Positive: the masked
pixels mattered more for <i>c</i> than for its look-alike <i>d</i>. Averaged over all images.</li>
</ul>
<p class="note">Ties are broken deterministically (the first pixel in row-major order). At a high γ a map can be
entirely zero (the contrast is negative everywhere); such a map points at the top-left pixel (a miss), has no energy
and masks the top rows for RD. <code>metrics.json</code> records the share of such maps as
<code>empty_maps</code>.</p>"""


NUM_REFS = 3


def _card_summary(card: dict[str, Any]) -> str:
    """The card's short top-level facts (accuracies, sizes, ...) and its data seeds, on one line."""
    card = card or {}
    facts = {k: v for k, v in card.items() if isinstance(v, int | float | str) and len(str(v)) <= 40}
    data = card.get("data") if isinstance(card.get("data"), dict) else {}
    facts |= {k: v for k, v in data.items() if "seed" in k}
    if "seeds" in card:
        facts["seeds"] = card["seeds"]
    text = ", ".join(f"{k}={v}" for k, v in facts.items())
    return text if len(text) < 300 else text[:297] + "..."


def _legend(names: Sequence[str]) -> str:
    return "; ".join(f"<b>{html.escape(name.split('-', 1)[0])}</b> {html.escape(_short(name).split(' ', 1)[-1])}"
                     for name in names)


TITLE = "finercam demo report"
"""The report's title, by which a demo knows its own earlier report."""


def write_report(
    path: Path, runs: Sequence[ModelRun], args: argparse.Namespace, seconds: float, *, version: str
) -> Path:
    """Write the report to ``path`` and return it."""
    ks = tuple(args.ks)
    records = [r for run in runs for r in run.records]
    samples = []
    for run in runs:
        picture = samples_figure(run, args.gammas)
        if picture is not None:
            samples.append(
                f"<h3>{html.escape(run.spec.name)}</h3>"
                "<p class='note'>Columns: the image (true and predicted class); an exemplar of its most similar "
                "reference class; the Grad-CAM baseline; Finer-CAM (Grad-CAM) at several gammas against the 3 "
                "nearest classes; the difference mask (white outline) between the prediction and its most similar "
                "class. × marks each map's peak (the pointing game's answer).</p>"
                + _img(picture, f"sample explanations of {run.spec.name}")
            )
    body = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{TITLE}</title><style>{STYLE}</style></head><body>
<h1>Finer-CAM on the synthetic fine-grained benchmark</h1>
<p class="note">finercam {html.escape(version)}, {len(records)} records, {seconds:.0f} s. The same numbers are in
<code>metrics.json</code>.</p>
<h2>Base CAM vs Finer-CAM (γ = 0.6, 3 references)</h2>
{_headline(runs, ks)}
<p class="note"><b>mean</b>: the paper's aggregation,
<i>y<sub>c</sub> − γ · mean<sub>t</sub> y<sub>d<sub>t</sub></sub></i>; <b>softmax</b>: the official library's
(<code>FinerWeightedTarget</code>), each reference weighted by its probability,
so the most similar one dominates.</p>
<h2>All metrics</h2>
<p class="note">Blue rows: the base CAM (γ = 0); yellow rows: the paper's setting (γ = 0.6). ↑ higher is better.</p>
{_table(records, ks)}
<h2>Localization against γ</h2>
{_img(gamma_plot(runs, ks), "localization and RD against gamma")}
<h2>Sample explanations</h2>
{''.join(samples) or '<p>(no Grad-CAM run: no samples)</p>'}
<p class="note">Classes: {_legend(runs[0].spec.class_names)}</p>
<h2>Protocol and metrics</h2>
{_protocol(runs, args)}
</body></html>
"""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(body, encoding="utf-8")
    return path
