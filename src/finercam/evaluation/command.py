"""``finercam evaluate``: compare base CAMs with Finer-CAM at several gammas on a dataset, with confidence intervals.

Writes to ``--out``: ``results.json`` (options, per-row means / intervals / differences to the base CAM, mean curves),
``results.csv``, ``results.md``, ``curves.png`` and ``metrics_vs_gamma.png`` (with matplotlib), and the resumable
``progress.jsonl``.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

import finercam
from finercam.argtypes import gamma, non_negative_float, non_negative_int, output_dir, positive_float, positive_int
from finercam.argtypes import seed as seed_type
from finercam.errors import InvalidArgumentError, MissingDependencyError
from finercam.evaluation.annotations import REGION_KINDS, Regions, check_coverage, load_regions
from finercam.evaluation.inputs import DEFAULT_TOLERANCE, check_arguments, linear_head, metric_groups
from finercam.evaluation.runner import TARGETS, EvaluationOptions, evaluate_dataset
from finercam.evaluation.scoring import METRIC_GROUPS, ScoreOptions, normalised_zero, pixel_fill
from finercam.evaluation.summary import csv_text, markdown, strict_json, summarize
from finercam.fingerprint import FINGERPRINTS, model_fingerprints
from finercam.images import image_folder
from finercam.methods import METHODS
from finercam.metrics import DEFAULT_KS, DEFAULT_RESAMPLES, DEFAULT_STEPS, FILLS
from finercam.runtime import cpu_threads, resolve_device


def _fill(text: str) -> str | float:
    if text in FILLS:
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be one of {list(FILLS)} or a number, got {text!r}") from None
    if not math.isfinite(value) or not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be one of {list(FILLS)} or a pixel value in [0, 1] (0 black, 0.5 "
                                         f"grey, 1 white), got {text!r}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a fraction in (0, 1], e.g. 0.05; got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be a fraction in (0, 1], e.g. 0.05; got {text}")
    return value


def add_command(
    commands: argparse._SubParsersAction, model_arguments: Callable[[argparse.ArgumentParser], None]
) -> None:
    """Register ``evaluate``; ``model_arguments`` adds the model options shared by the commands (``--model`` ...)."""
    parser = commands.add_parser(
        "evaluate", help="compare base CAMs and Finer-CAM on a dataset: RD@k, deletion/insertion, localization")
    model_arguments(parser)
    parser.add_argument("--data", required=True, help="an ImageFolder tree (one sub-folder of images per class)")
    parser.add_argument("--annotations", help="ground truth for localization: a synthetic dataset's annotations.json, "
                        "a CUB-200-2011 folder, or a JSON regions file")
    parser.add_argument("--regions", choices=REGION_KINDS, help="which regions of the annotations (default: "
                        "difference for synthetic data, box otherwise)")
    parser.add_argument("--keypoint-radius", type=non_negative_float, help="disk radius of keypoints, input pixels "
                        "(default 4%% of the shorter side)")
    parser.add_argument("--out", type=output_dir, default="finercam-eval",
                        help="output folder (default: ./finercam-eval)")
    parser.add_argument("--layer", help="target layer (default: the model's recommended layer, else auto)")
    parser.add_argument("--methods", nargs="+", default=["gradcam"], choices=sorted(METHODS))
    parser.add_argument("--gammas", nargs="+", type=gamma, default=[0.0, 0.3, 0.6, 1.0, 2.0],
                        help="comparison strengths; 0 (the base CAM) is always included")
    parser.add_argument("--target", choices=TARGETS, default="prediction", help="explain the prediction or the label")
    parser.add_argument("--references", default="nearest", choices=["nearest", "top", "weights"])
    parser.add_argument("--num-references", type=positive_int, default=3)
    parser.add_argument("--aggregation", default="mean", choices=["mean", "softmax"])
    parser.add_argument("--metrics", nargs="+", choices=METRIC_GROUPS,
                        help="metric groups (default: all, pointing and energy when --annotations are given; "
                        "pointing/energy need --annotations)")
    parser.add_argument("--ks", nargs="+", type=_fraction, default=list(DEFAULT_KS), help="RD fractions")
    parser.add_argument("--fill", type=_fill, default="mean",
                        help=f"what removed pixels become: {', '.join(FILLS)} or a number (default: mean, i.e. zero "
                        "in the model's normalised space; zero is black and a number a pixel value in [0, 1], "
                        "whatever the normalisation)")
    parser.add_argument("--blur-sigma", type=positive_float,
                        help="for --fill blur, pixels > 0 (default 2.5%% of the longer side)")
    parser.add_argument("--steps", type=positive_int, default=DEFAULT_STEPS, help="deletion / insertion steps")
    parser.add_argument("--tolerance", type=non_negative_int,
                        help=f"pointing-game tolerance, pixels (default {DEFAULT_TOLERANCE})")
    parser.add_argument("--correct-only", action="store_true", help="aggregate only correctly classified images")
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument("--score-batch-size", type=positive_int, default=256, help="Score-CAM masked inputs per pass")
    parser.add_argument("--workers", type=non_negative_int, default=0, help="image decoding processes")
    parser.add_argument("--limit", type=positive_int, help="evaluate only the first N images (sorted by path)")
    parser.add_argument("--resamples", type=positive_int, default=DEFAULT_RESAMPLES, help="bootstrap resamples")
    parser.add_argument("--seed", type=seed_type, default=0, help="bootstrap seed")
    parser.add_argument("--restart", action="store_true", help="discard a partial run in --out instead of resuming")
    parser.add_argument("--threads", type=non_negative_int, default=0, help="torch CPU threads (default: torch's)")


def _labels(folder_classes: tuple[str, ...], class_names: tuple[str, ...] | None) -> tuple[list[int | None], str]:
    """Each folder's class index in the model, and a note on the folders that match no class."""
    if class_names is None:
        return [None] * len(folder_classes), "the model has no class names: labels unknown"
    index = {name: i for i, name in enumerate(class_names)}
    labels = [index.get(name) for name in folder_classes]
    missing = [name for name, label in zip(folder_classes, labels, strict=True) if label is None]
    if not missing:
        return labels, ""
    hints = [f"{name!r} (closest: {difflib.get_close_matches(name, class_names, 1, 0.5) or ['none']})"
             for name in missing[:5]]
    return labels, f"{len(missing)} folder names are not the model's class names: {', '.join(hints)}"


def run_evaluate(args: argparse.Namespace) -> int:
    """Run ``finercam evaluate``."""
    with cpu_threads(args.threads):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from finercam.explain_image import known_num_classes
    from finercam.models import load_model

    check_arguments(args)  # everything that can be checked before the model loads and the images are read
    metrics = metric_groups(args.metrics, args.annotations)
    score = ScoreOptions(metrics=metrics, ks=tuple(args.ks), fill=args.fill, blur_sigma=args.blur_sigma,
                         steps=args.steps, tolerance=DEFAULT_TOLERANCE if args.tolerance is None else args.tolerance,
                         pass_size=max(args.batch_size, 256))
    folder = image_folder(args.data)
    paths = [path for path, _ in folder.samples][: args.limit]
    regions = load_regions(args.annotations, args.regions, args.keypoint_radius) if args.annotations else None
    coverage = ""
    if regions is not None and {"pointing", "energy"} & set(metrics):
        coverage = check_coverage(regions, paths, args.annotations)
    device = resolve_device(args.device)
    loaded = load_model(args.model, weights=args.weights, head=args.head, preprocess=args.preprocess, device=device)
    labels, note = _labels(folder.classes, loaded.class_names)
    if note and (args.target == "label" or args.correct_only):
        raise InvalidArgumentError(f"{note}; --target label and --correct-only need them to match")
    head = None
    if args.references == "weights":
        head = linear_head(loaded.model, args.model, len(loaded.class_names) if loaded.class_names else None)
    items = [(path, labels[index]) for path, index in folder.samples][: args.limit]
    fill_mean = normalised_zero(loaded.model, loaded.preprocess.mean)
    if args.fill == "mean" and fill_mean is None:
        raise InvalidArgumentError("the model's normalisation is unknown, so --fill mean (zero in normalised space) "
                                   "is undefined; give --fill zero, image-mean, blur or a number")
    score = replace(score, fill_mean=fill_mean,
                    fill_pixels=pixel_fill(args.fill, loaded.preprocess.mean, loaded.preprocess.std))
    options = EvaluationOptions(
        methods=tuple(dict.fromkeys(args.methods)), gammas=tuple(args.gammas), target=args.target,
        references=args.references, num_references=args.num_references, aggregation=args.aggregation,
        layer=args.layer or loaded.target_layer, score=score, correct_only=args.correct_only,
        batch_size=args.batch_size, score_batch_size=args.score_batch_size,
    )
    out = Path(args.out)
    data = f"{Path(args.data).resolve()}"
    model = {"model": args.model, "weights": args.weights, "head": args.head, "preprocess": args.preprocess,
             FINGERPRINTS: model_fingerprints(args.model, args.weights, args.head)}  # a changed file stops a resume
    description = f"{data} ({len(items)} images); model {args.model}"
    print(f"finercam evaluate: {len(items)} images from {args.data}, model {args.model}, methods "
          f"{list(options.methods)}, gammas {list(options.gammas)}, metrics {score.names(regions is not None)}",
          flush=True)
    classes = known_num_classes(loaded)
    if classes is not None and args.num_references > classes - 1:
        note_lines = [f"--num-references {args.num_references} is more than the {classes - 1} other classes: each "
                      f"image is contrasted with all {classes - 1}"]
    else:
        note_lines = []
    for line in (note and f"{note}; accuracy is not reported for them", coverage, *note_lines):
        if line:
            print(f"note: {line}", flush=True)
    records = evaluate_dataset(
        loaded.model, loaded.preprocess, items, out, options, class_names=loaded.class_names, regions=regions,
        workers=args.workers, restart=args.restart, data_description=data, classifier_weights=head,
        model_description=model, log=lambda line: print(f"note: {line}", flush=True),
    )
    summary = summarize(records, options.methods, options.gammas, correct_only=options.correct_only,
                        resamples=args.resamples, seed=args.seed)
    written = _write(out, summary, options, args, regions, description)
    if summary.n_images == 0 and summary.skipped:
        for item in summary.skipped[:5]:
            print(f"  skipped {item['path']}: {item['reason']}", file=sys.stderr)
        raise InvalidArgumentError(
            f"no image could be evaluated: all {len(summary.skipped)} files of {args.data} are unreadable (the "
            "first are listed above; every one is in results.json)"
        )
    print(markdown(summary))
    if summary.accuracy is not None:
        print(f"accuracy {summary.accuracy:.1%}")
    if summary.skipped:
        print(f"skipped {len(summary.skipped)} unreadable file(s), e.g. {summary.skipped[0]['path']}: "
              f"{summary.skipped[0]['reason']} (all in results.json)")
    for path in written:
        print(f"wrote {path}")
    return 0


def _write(out: Path, summary: Any, options: EvaluationOptions, args: argparse.Namespace, regions: Regions | None,
           description: str) -> list[Path]:
    from finercam.evaluation.plots import curves_figure, gamma_figure

    result = {
        "finercam_version": finercam.__version__, "torch_version": torch.__version__, "data": description,
        "model": args.model, "weights": args.weights, "head": args.head, "preprocess": args.preprocess,
        "options": asdict(options), "regions": regions.description if regions else None,
        "regions_source": regions.identity() if regions else None, "n_images": summary.n_images,
        "accuracy": summary.accuracy, "skipped": summary.skipped, "confidence_level": summary.level,
        "bootstrap": {"resamples": args.resamples, "seed": args.seed}, "rows": summary.rows,
        "curves": summary.curves,
    }
    paths = [out / "results.json", out / "results.csv", out / "results.md"]
    texts = [json.dumps(strict_json(result), indent=2, default=str, allow_nan=False) + "\n", csv_text(summary),
             markdown(summary)]
    for path, text in zip(paths, texts, strict=True):
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    try:
        paths += [p for p in (curves_figure(summary, out / "curves.png"),
                              gamma_figure(summary, out / "metrics_vs_gamma.png")) if p is not None]
    except MissingDependencyError as error:
        print(f"plots skipped: {error}", file=sys.stderr)
    return paths
