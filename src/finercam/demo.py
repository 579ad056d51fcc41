"""The ``finercam demo`` job: explain the embedded models on a fresh synthetic test set and measure the explanations.

For each embedded model (:mod:`finercam.embedded`) and each base CAM method (Grad-CAM, Layer-CAM, Score-CAM), one
:meth:`FinerCAM.sweep <finercam.explain.FinerCAM.sweep>` per batch gives the maps at every gamma of :data:`GAMMAS`
(gamma 0 is the base CAM). The target is the model's prediction, the references are its 3 nearest classes; each map
is scored against the *difference mask* between the target and its first (most similar) reference, the visible
parts whose appearance differs between the two classes, known exactly on the synthetic benchmark:

* pointing game: is the map's peak inside the mask grown by ``--tolerance`` pixels;
* energy: the share of the map's mass inside the mask;
* RD@5% and RD@10%: the relative confidence drop when the top pixels of the map are filled with the model's mean.

Writes ``metrics.json`` (one record per model, method and gamma) and a self-contained ``report.html``
(:mod:`finercam.report`), and prints a summary table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

import finercam
from finercam import synth
from finercam.errors import InvalidArgumentError, ModelFileNotFoundError
from finercam.evaluation.scoring import ScoreOptions, score_sweep
from finercam.explain import FinerCAM
from finercam.methods import METHODS
from finercam.metrics import DEFAULT_KS, rd_name
from finercam.report import PAPER_GAMMA, headline_pairs, pointing_ratio, write_report
from finercam.report import TITLE as REPORT_TITLE
from finercam.runtime import cpu_threads
from finercam.synth.io import split_seeds

GAMMAS = (0.0, 0.3, 0.6, 1.0, 2.0)
DEMO_METHODS = ("gradcam", "layercam", "scorecam")
NUM_REFERENCES = 3
AGGREGATIONS = ("mean", "softmax")
"""``mean``: the paper's Eq. 8; ``softmax``: the official library's ``FinerWeightedTarget`` (references weighted by
their probability, so the most similar one dominates)."""
DEFAULT_SIZE = 240
DEFAULT_SEED = 8128
DEFAULT_TOLERANCE = 2
DEFAULT_BATCH = 120
DEFAULT_SCORE_BATCH = 1024
SHOWN = 6
FILL = "mean"


class DemoModel(Protocol):
    """What the demo needs of a model (:class:`finercam.embedded.EmbeddedModel` has it)."""

    @property
    def name(self) -> str:
        """Short name (``"cnn"``)."""

    @property
    def model(self) -> nn.Module:
        """The classifier in eval mode, taking images in ``[0, 1]``."""

    @property
    def class_names(self) -> Sequence[str]:
        """The synthetic benchmark's class names, in label order."""

    @property
    def target_layer(self) -> Any:
        """The layer to explain (a dotted name or a module)."""

    @property
    def mean(self) -> Sequence[float]:
        """The per-channel mean of the model's internal normalisation (fills masked pixels)."""

    @property
    def image_size(self) -> int:
        """The side of its square inputs."""

    @property
    def card(self) -> dict[str, Any]:
        """Facts about the model: accuracy, seeds, data configuration (``card["data"]["config"]``)..."""


@dataclass
class ModelRun:
    """Everything the report needs about one model.

    Attributes:
        spec: the model. test: the test set. records: one metrics record per method and gamma.
        predictions: ``(N,)`` explained targets. references: ``(N, T)`` reference classes.
        probabilities: ``(N, C)``. gradcam_maps: per aggregation, ``(G, N, H, W)`` Grad-CAM maps at every gamma
            (for the samples).
        differences: ``(N, H, W)`` difference masks (target vs first reference). accuracy: top-1 accuracy.
        seconds: wall time per ``method/aggregation``.
    """

    spec: DemoModel
    test: synth.SynthDataset
    records: list[dict[str, Any]] = field(default_factory=list)
    predictions: Tensor | None = None
    references: Tensor | None = None
    probabilities: Tensor | None = None
    gradcam_maps: dict[str, Tensor] = field(default_factory=dict)
    differences: Tensor | None = None
    accuracy: float = 0.0
    seconds: dict[str, float] = field(default_factory=dict)


def _say(line: str) -> None:
    print(line, flush=True)


def _card_seeds(card: dict[str, Any]) -> set[int]:
    """Every integer under a key of the card that mentions "seed", with the split seeds derived from each."""
    found: set[int] = set()

    def walk(value: object, seedy: bool) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(item, seedy or "seed" in str(key).lower())
        elif isinstance(value, list | tuple):
            for item in value:
                walk(item, seedy)
        elif seedy and isinstance(value, int) and not isinstance(value, bool):
            found.add(value)

    walk(card, False)
    return found | {derived for seed in found for derived in split_seeds(seed).values()}


def fresh_seed(models: Iterable[DemoModel], seed: int = DEFAULT_SEED) -> int:
    """``seed``, or the next integer that neither itself nor its test-split seed is a seed a model's card lists (or
    derives into)."""
    used = set().union(*(_card_seeds(getattr(m, "card", {}) or {}) for m in models))
    while seed in used or split_seeds(seed)["test"] in used:
        seed += 1
    return seed


def _data_config(models: Sequence[DemoModel]) -> dict[str, int]:
    """The synthetic configuration the models were trained on: image size, and the genera and species per genus
    when a card records them (``card["data"]["config"]``)."""
    configs = []
    for model in models:
        recorded = ((model.card or {}).get("data") or {}).get("config") or {}
        config = {"image_size": int(model.image_size)}
        config |= {key: int(recorded[key]) for key in ("num_genera", "species_per_genus") if key in recorded}
        configs.append(config)
    if any(config != configs[0] for config in configs):
        raise InvalidArgumentError(f"the models were trained on different data {configs}; run them one at a time")
    return configs[0]


def _test_set(models: Sequence[DemoModel], size: int, seed: int) -> synth.SynthDataset:
    """The test split of the synthetic dataset of seed ``seed``, quantised to 8 bits: the very images that
    ``finercam synth --out DIR --train 0 --test SIZE --seed SEED`` writes to ``DIR/test`` (so ``finercam evaluate``
    on that folder reproduces the demo's numbers)."""
    test = synth.generate(size, split_seeds(seed)["test"], **_data_config(models))  # type: ignore[arg-type]
    test = dataclasses.replace(test, images=test.images.mul(255).round_().div_(255))
    for model in models:
        if list(model.class_names) != test.class_names:
            raise InvalidArgumentError(
                f"model {model.name!r} was not trained on the default synthetic benchmark: its classes "
                f"{list(model.class_names)[:3]}... differ from {test.class_names[:3]}..."
            )
    return test


def _batches(count: int, batch: int) -> Iterable[slice]:
    return (slice(start, min(start + batch, count)) for start in range(0, count, batch))


def evaluate_model(
    spec: DemoModel,
    test: synth.SynthDataset,
    args: argparse.Namespace,
    log: Callable[[str], None] = _say,
) -> ModelRun:
    """Explain ``test`` with every method of ``args.methods`` and score every gamma; see the module docstring."""
    run = ModelRun(spec, test)
    spec.model.eval()
    count, gammas = len(test), tuple(args.gammas)
    aggregations = tuple(getattr(args, "aggregations", None) or AGGREGATIONS)
    for method in args.methods:
        for aggregation in aggregations:
            start = time.perf_counter()
            _explain_and_score(run, method, aggregation, args)
            seconds = time.perf_counter() - start
            run.seconds[f"{method}/{aggregation}"] = seconds
            for record in run.records[-len(gammas):]:
                record["method_seconds"] = round(seconds, 2)
            log(f"  {spec.name} {METHODS[method].title} ({aggregation}): {count} images, {len(gammas)} gammas, "
                f"{seconds:.1f} s")
    return run


def _explain_and_score(run: ModelRun, method: str, aggregation: str, args: argparse.Namespace) -> None:
    """One method and aggregation over the whole test set: a sweep per batch, scored; appends the records."""
    spec, test = run.spec, run.test
    model, count, gammas = spec.model, len(test), tuple(args.gammas)
    cam = FinerCAM(model, spec.target_layer, method, score_batch_size=args.score_batch_size)
    options = ScoreOptions(metrics=("pointing", "energy", "rd"), ks=tuple(args.ks), fill=FILL,
                           fill_mean=tuple(spec.mean), tolerance=args.tolerance)
    values: list[dict[str, list[Tensor]]] = [{} for _ in gammas]
    empty: list[list[Tensor]] = [[] for _ in gammas]
    targets, references, probabilities, differences, maps_kept = [], [], [], [], []
    cell = 0
    for rows in _batches(count, args.batch_size):
        images = test.images[rows]
        sweep = cam.sweep(images, gammas, references="nearest", num_references=NUM_REFERENCES,
                          aggregation=aggregation)
        cell = images.shape[-1] // sweep.layer_raw_maps[0].shape[-1]
        difference = synth.difference_mask(test.part_map[rows], sweep.targets, sweep.references[:, 0], test.config)
        scores = score_sweep(model, images, sweep, options, difference)
        for g in range(len(gammas)):
            for name, value in scores.values[g].items():
                values[g].setdefault(name, []).append(value)
            empty[g].append(scores.empty[g])
        targets.append(sweep.targets)
        references.append(sweep.references)
        probabilities.append(sweep.probabilities)
        differences.append(difference)
        if method == "gradcam":
            maps_kept.append(sweep.maps)
    predictions = torch.cat(targets)
    run.accuracy = float((predictions == test.labels).float().mean())
    if run.predictions is None:
        run.predictions, run.references = predictions, torch.cat(references)
        run.probabilities, run.differences = torch.cat(probabilities), torch.cat(differences)
    if maps_kept:
        run.gradcam_maps[aggregation] = torch.cat(maps_kept, dim=1)
    for g, gamma in enumerate(gammas):
        run.records.append({
            "model": spec.name,
            "method": method,
            "method_title": METHODS[method].title,
            "finer": gamma > 0,
            "gamma": gamma,
            "aggregation": aggregation,
            **{name: round(float(torch.cat(parts).mean()), 4) for name, parts in values[g].items()},
            "n_images": count,
            "empty_maps": round(float(torch.cat(empty[g]).float().mean()), 4),
            "accuracy": round(run.accuracy, 4),
            "target": "prediction",
            "references": "nearest",
            "num_references": NUM_REFERENCES,
            "mask": "difference mask between the target and its first (most similar) reference",
            "pointing_tolerance_px": args.tolerance,
            "map_cell_px": cell,
            "rd_ks": list(args.ks),
            "rd_fill": FILL,
            "rd_fill_value": [round(float(v), 6) for v in spec.mean],
            "test_seed": args.seed,
            "image_size": int(test.images.shape[-1]),
        })


def _load_models(names: Sequence[str]) -> list[DemoModel]:
    """The embedded models ``names``; a missing weights file is a one-line error."""
    from finercam.embedded import load_embedded

    try:
        return [load_embedded(name) for name in names]
    except FileNotFoundError as error:
        raise ModelFileNotFoundError(str(error)) from None


def format_table(records: Sequence[dict[str, Any]], ks: Sequence[float] = DEFAULT_KS) -> str:
    """The records as a plain-text table (one line per model, method, aggregation and gamma)."""
    columns = ["model", "method", "aggregation", "gamma", "finer", "pointing", "energy", *(rd_name(k) for k in ks)]
    lines = [columns]
    for record in records:
        lines.append([
            record["model"], record["method_title"], record["aggregation"], f"{record['gamma']:g}",
            "yes" if record["finer"] else "no", f"{record['pointing']:.3f}", f"{record['energy']:.3f}",
            *(f"{record[rd_name(k)]:+.4f}" for k in ks),
        ])
    widths = [max(len(row[i]) for row in lines) for i in range(len(columns))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
                     for row in lines)


def headline(records: Sequence[dict[str, Any]], k: float = DEFAULT_KS[0]) -> list[str]:
    """One line per model, method and aggregation: base CAM against Finer-CAM at the paper's gamma."""
    return [
        f"{base['model']} {base['method_title']} -> Finer ({base['aggregation']}, gamma {PAPER_GAMMA:g}): pointing "
        f"{base['pointing']:.3f} -> {finer['pointing']:.3f} (x{pointing_ratio(base, finer):.2f}), energy "
        f"{base['energy']:.3f} -> {finer['energy']:.3f}, {rd_name(k)} {base[rd_name(k)]:+.4f} -> "
        f"{finer[rd_name(k)]:+.4f}"
        for base, finer in headline_pairs(records)
    ]


def run_demo(args: argparse.Namespace, models: Sequence[DemoModel] | None = None) -> int:
    """``finercam demo``: evaluate, write ``metrics.json`` and ``report.html``, print a summary. ``models``
    replaces the embedded models (for tests)."""
    with cpu_threads(args.threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return _run_demo(args, models)


def check_outputs(out: Path) -> None:
    """Refuse, before any work, an ``--out`` whose ``metrics.json`` or ``report.html`` a demo did not write (a
    user's own files of those names) or that are not files; a demo's own earlier outputs are replaced.

    Raises:
        InvalidArgumentError: naming the file and why.
    """
    for name, ours in (("metrics.json", _demo_metrics), ("report.html", _demo_report)):
        path = out / name
        if not path.exists():
            continue
        if not path.is_file():
            raise InvalidArgumentError(f"--out {str(out)!r} holds {name}, which is not a file; the demo writes a file "
                                       "there: give another --out folder")
        if not ours(path):
            raise InvalidArgumentError(f"--out {str(out)!r} holds a {name} that finercam demo did not write; it is "
                                       "not replaced: give another --out folder, or move the file away")


def _demo_metrics(path: Path) -> bool:
    try:
        records = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(records, list) and all(isinstance(r, dict) and {"model", "method", "gamma"} <= r.keys()
                                             for r in records)


def _demo_report(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return f"<title>{REPORT_TITLE}</title>" in handle.read(4096)
    except OSError:
        return False


def _run_demo(args: argparse.Namespace, models: Sequence[DemoModel] | None) -> int:
    start = time.perf_counter()
    check_outputs(Path(args.out))
    specs = list(models) if models is not None else _load_models(args.models)
    args.gammas = tuple(float(g) for g in getattr(args, "gammas", None) or GAMMAS)
    args.ks = tuple(getattr(args, "ks", None) or DEFAULT_KS)
    args.seed = fresh_seed(specs, args.seed)
    test = _test_set(specs, args.size, args.seed)
    _say(
        f"finercam demo: {len(test)} synthetic test images (seed {args.seed}, not a training or test seed of the "
        f"models), models {[s.name for s in specs]}, methods {list(args.methods)}, gammas {list(args.gammas)}"
    )
    runs = []
    for spec in specs:
        run = evaluate_model(spec, test, args)
        _say(f"  {spec.name}: accuracy {run.accuracy:.1%} on the test set")
        runs.append(run)
    records = [record for run in runs for record in run.records]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.json"
    metrics_path.write_text(json.dumps(records, indent=2) + "\n")
    seconds = time.perf_counter() - start
    report_path = write_report(out / "report.html", runs, args, seconds, version=finercam.__version__)
    _say("")
    _say(format_table(records, args.ks))
    _say("")
    for line in headline(records, args.ks[0]):
        _say(line)
    _say("")
    _say(f"wrote {metrics_path}")
    _say(f"wrote {report_path}  ({time.perf_counter() - start:.0f} s in all)")
    _say(f"open the report: {report_path.resolve().as_uri()}")
    return 0
