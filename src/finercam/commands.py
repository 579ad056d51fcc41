"""The ``explain``, ``layers`` and ``train-probe`` commands: from parsed arguments to the jobs, and their console
output."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from finercam.errors import InvalidArgumentError
from finercam.images import load_image, train_val_folders
from finercam.models import LoadedBackbone
from finercam.runtime import resolve_device


def _say(line: str) -> None:
    print(line, flush=True)


def run_explain(args: argparse.Namespace) -> int:
    """``finercam explain IMAGE --model SPEC``."""
    from finercam.explain_image import display_image, explain_image, parse_target, save_figure
    from finercam.models import load_model

    device = resolve_device(args.device)
    loaded = load_model(args.model, weights=args.weights, head=args.head, preprocess=args.preprocess, device=device)
    pixels = loaded.preprocess(load_image(args.image)).to(device)
    explanation = explain_image(
        loaded,
        pixels,
        layer=args.layer,
        method=args.method,
        target=parse_target(args.target, loaded.class_names),
        references=args.references,
        num_references=args.num_references,
        gamma=args.gamma,
        aggregation=args.aggregation,
    )
    _say(f"model: {args.model}   layer: {explanation.layer}   method: {args.method}   input: {tuple(pixels.shape)}")
    _say(f"prediction: {explanation.prediction}")
    if explanation.target.index != explanation.prediction.index:
        _say(f"explained:  {explanation.target}")
    if explanation.references:
        _say(f"references ({args.references}, gamma {args.gamma:g}, {args.aggregation}):")
        for reference in explanation.references:
            _say(f"  {reference}")
    else:
        _say("references: none (the model has a single class): the base CAM of y_c is shown")
    default_name = f"{Path(args.image).stem}.finercam.png"
    out = Path(args.out) if args.out else Path("finercam-out") / default_name
    if out.is_dir():
        out = out / default_name
    display = display_image(args.image, loaded.preprocess)
    written = save_figure(out, display, explanation, args.method, args.gamma)
    _say(f"wrote {written}")
    return 0


def run_layers(args: argparse.Namespace) -> int:
    """``finercam layers MODEL``: the candidate target layers, the automatic choice marked."""
    from finercam.autolayer import candidate_layers
    from finercam.models import load_backbone, load_model

    try:
        loaded = load_model(args.model, weights=args.weights, head=args.head)
        model, recommended = loaded.model, loaded.target_layer
    except InvalidArgumentError:
        if args.head:
            raise
        model, recommended = load_backbone(args.model, weights=args.weights).features, None  # a head-less backbone
    size = tuple(args.size) if args.size else None
    candidates = candidate_layers(model, size)  # type: ignore[arg-type]
    width = max((len(c.name) for c in candidates), default=10)
    _say(f"candidate target layers of {args.model} (* = used by target_layer='auto'):")
    for candidate in candidates:
        shape = "x".join(str(d) for d in candidate.output_shape) if candidate.output_shape else "?"
        mark = "*" if candidate.recommended else " "
        _say(f" {mark} {candidate.name:<{width}}  {candidate.kind:<22} {shape}")
    if recommended:
        _say(f"the loader recommends: {recommended}")
    return 0


def _head_metadata(backbone: LoadedBackbone, preset: str | None) -> dict[str, str]:
    """What ``--head`` needs to rebuild the features: the resolved pooling and, when a preset was named, it."""
    metadata = {"pooling": backbone.pooling, "preprocessing": backbone.preprocess.describe()}
    if preset:
        metadata["preprocess"] = preset
    return metadata


def run_probe(args: argparse.Namespace) -> int:
    """``finercam train-probe --model SPEC --data DIR --out HEAD``."""
    from finercam.models import load_backbone
    from finercam.probe import class_summary, train_probe

    torch.manual_seed(args.seed)
    device = resolve_device(args.device)
    backbone = load_backbone(
        args.model, weights=args.weights, preprocess=args.preprocess, pooling=args.pooling, device=device
    )
    train, val = train_val_folders(args.data, val_fraction=args.val_fraction, seed=args.seed)
    _say(
        f"train-probe: {args.model} ({backbone.dim}-d features, {device}); {len(train.classes)} classes "
        f"({class_summary(train.classes)}); {len(train.samples)} train / {len(val.samples)} val images"
    )
    report = train_probe(
        backbone, train, val, Path(args.out),
        cache_dir=Path(args.cache), weights=args.weights, batch_size=args.batch_size,
        weight_decay=args.weight_decay, metadata=_head_metadata(backbone, args.preprocess), log=_say,
    )
    cached = " (features from the cache)" if all(report.cached) else ""
    _say(f"features: {report.feature_seconds:.1f} s{cached}; head fitted in {report.train_seconds:.1f} s")
    _say(f"accuracy: train {report.train_accuracy:.1%}, val {report.val_accuracy:.1%}")
    _say(f"wrote {report.head_path}  (use it with --model {args.model} --head {report.head_path})")
    return 0
