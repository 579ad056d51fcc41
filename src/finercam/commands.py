"""The ``explain``, ``layers`` and ``train-probe`` commands: from parsed arguments to the jobs, and their console
output."""

from __future__ import annotations

import argparse
import math
import warnings
from pathlib import Path

import torch
from torch import nn

from finercam.errors import InvalidArgumentError
from finercam.images import ImageFolder, load_image, train_val_folders
from finercam.models import LoadedBackbone, LoadedModel
from finercam.models.heads import BACKBONE_WEIGHTS
from finercam.runtime import resolve_device


def _say(line: str) -> None:
    print(line, flush=True)


def run_explain(args: argparse.Namespace) -> int:
    """``finercam explain IMAGE --model SPEC``."""
    from finercam.cli import MAPS_FORMAT, figure_file, maps_file
    from finercam.explain_image import (
        display_image,
        explain_image,
        explain_top_classes,
        known_num_classes,
        parse_target,
        save_figure,
        save_maps,
    )
    from finercam.models import load_model

    _check_explain_options(args)
    references = args.references or "nearest"
    out = figure_file(args.out, f"{Path(args.image).stem}.finercam.png", Path("finercam-out"), inputs=[args.image])
    maps_path = maps_file(out, EXPLAIN_MAPS)
    device = resolve_device(args.device)
    loaded = load_model(args.model, weights=args.weights, head=args.head, preprocess=args.preprocess, device=device)
    pixels = loaded.preprocess(load_image(args.image)).to(device)
    versus = None
    if args.versus:
        versus = [parse_target(name, loaded.class_names, "--versus") for name in args.versus]
        _check_classes(versus, loaded, "--versus")
    target = parse_target(args.target, loaded.class_names)
    if target is not None:
        _check_classes([target], loaded, "--target")
    options = {"layer": args.layer, "method": args.method, "references": references,
               "num_references": args.num_references or 3, "gamma": args.gamma, "aggregation": args.aggregation}
    if args.classes:
        count = known_num_classes(loaded)
        if count is not None and args.classes > count:
            raise InvalidArgumentError(
                f"--classes {args.classes} asks for the top {args.classes} predictions, but {loaded.spec} has {count} "
                f"classes; give 1..{count}"
            )
        explanations = explain_top_classes(loaded, pixels, args.classes, **options)
    else:
        explanations = (explain_image(loaded, pixels, target=target, versus=versus, **options),)  # type: ignore[arg-type]
    first = explanations[0]
    _say(f"model: {args.model}   layer: {first.layer}   method: {args.method}   input: {tuple(pixels.shape)}")
    _say(f"prediction: {first.prediction}")
    for explanation in explanations:
        if len(explanations) > 1 or explanation.target.index != explanation.prediction.index:
            _say(f"explained:  {explanation.target}")
        if explanation.references:
            chosen = "given with --versus" if versus else references
            _say(f"references ({chosen}, gamma {args.gamma:g}, {args.aggregation}):")
            for reference in explanation.references:
                _say(f"  {reference}")
        else:
            _say("references: none (the model has a single class): the base CAM of y_c is shown")
        blank = {
            "base CAM": (explanation.result.baseline_raw_maps, "nothing in the image raises its score"),
            "Finer-CAM map": (explanation.result.raw_maps,
                              f"nothing in the image favours it over its references at gamma {args.gamma:g}"),
        }
        for shown, (raw, what) in blank.items():
            if float(raw.max()) <= 0:
                _say(f"the {shown} of {explanation.target.name} is negative everywhere: {what} (its panel is blank)")
    display = display_image(args.image, loaded.preprocess)
    written = save_figure(out, display, explanations, args.method, args.gamma)
    maps = save_maps(maps_path, explanations, tuple(display.shape[-2:]), {
        MAPS_FORMAT: EXPLAIN_MAPS, "model": args.model, "image": str(args.image), "preprocess": loaded.preprocess.name,
        "maps_on": "the model's centre crop" if loaded.preprocess.crop is not None else "the whole image",
    })
    _say(f"wrote {written} and {maps}")
    return 0


EXPLAIN_MAPS = "finercam-explain-maps"


def _check_explain_options(args: argparse.Namespace) -> None:
    """Refuse options of ``explain`` that contradict each other, before anything is loaded."""
    if args.versus and (args.references is not None or args.num_references is not None):
        given = "--references" if args.references is not None else "--num-references"
        raise InvalidArgumentError(
            f"--versus gives the reference classes themselves; {given} chooses them: give one or the other"
        )
    if args.classes and (args.target is not None or args.versus):
        given = ("--target names the one class to explain" if args.target is not None
                 else "--versus gives the references of one explained class")
        raise InvalidArgumentError(
            f"--classes explains the top predictions, each against its own references; {given}: give one or the other"
        )


def _check_classes(indices: list[int], loaded: LoadedModel, option: str) -> None:
    """Refuse a class index outside the model's classes (when their number is known without running it)."""
    from finercam.explain_image import known_num_classes

    count = known_num_classes(loaded)
    for index in indices:
        if index < 0 or (count is not None and index >= count):
            known = f"0..{count - 1} or a class name" if count is not None else "a class index >= 0 or a class name"
            raise InvalidArgumentError(f"{option} {index} is not a class of {loaded.spec}: give {known}")


def _layers_model(args: argparse.Namespace) -> tuple[nn.Module, str | None, tuple[int, int] | None]:
    """The model ``layers`` lists, the layer its loader recommends, and the input size its preprocessing gives.

    A classifier when the spec loads as one; otherwise (an image-text model, a checkpoint holding only a backbone)
    the head-less backbone, whose error is the one reported when that fails too. A head, or an ``embedded:`` model,
    is a finished classifier: its own error is the true one.
    """
    from finercam.models import load_backbone, load_model
    from finercam.models.spec import parse_spec

    if args.head or parse_spec(args.model).kind == "embedded":
        loaded = load_model(args.model, weights=args.weights, head=args.head)
        return loaded.model, loaded.target_layer, loaded.preprocess.fixed_size
    with warnings.catch_warnings(record=True) as caught:  # said again by the backbone's loader if it takes over
        warnings.simplefilter("always")
        try:
            loaded = load_model(args.model, weights=args.weights)
        except InvalidArgumentError:
            loaded = None
    if loaded is None:
        backbone = load_backbone(args.model, weights=args.weights)
        return backbone.features, None, backbone.preprocess.fixed_size
    for warning in caught:
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return loaded.model, loaded.target_layer, loaded.preprocess.fixed_size


MAX_DRY_RUN_TOKENS = 16384
"""The most tokens a ``layers`` dry run of a model with global attention takes (a 128 x 128 grid): attention's cost
grows with their square, so 4096 x 4096 pixels in 8-pixel patches (262,144 tokens) would run for hours."""


def _check_token_count(model: nn.Module, size: tuple[int, int]) -> None:
    """Refuse a dry-run size that gives a model with global attention more than :data:`MAX_DRY_RUN_TOKENS` tokens.

    The patch size is the product of the strides of the convolutions before the first attention module (a ViT's
    16 x 16 patch embedding, or a convolutional stem); window attention (Swin) grows linearly and is not bounded.
    """
    stride = [1, 1]
    for module in model.modules():
        name = type(module).__name__.lower()
        if "attention" in name:
            if "window" in name:
                return
            break
        if isinstance(module, nn.Conv2d):
            stride = [stride[0] * module.stride[0], stride[1] * module.stride[1]]
    else:
        return
    grid = (-(-size[0] // stride[0]), -(-size[1] // stride[1]))
    if grid[0] * grid[1] > MAX_DRY_RUN_TOKENS:
        largest = int((MAX_DRY_RUN_TOKENS * stride[0] * stride[1]) ** 0.5)
        raise InvalidArgumentError(
            f"--size {size[0]} {size[1]} gives this attention model {grid[0] * grid[1]:,} tokens ({grid[0]} x "
            f"{grid[1]} patches of {stride[0]} x {stride[1]} px), and attention grows with their square: the dry run "
            f"would take hours. Its layers are the same at any size; use at most about --size {largest} {largest} "
            f"({MAX_DRY_RUN_TOKENS:,} tokens)"
        )


def run_layers(args: argparse.Namespace) -> int:
    """``finercam layers MODEL``: the candidate target layers, the automatic choice marked.

    The dry run uses ``--size``, else the size the model's preprocessing gives (e.g. 64 x 64 for ``embedded:cnn``),
    else the size the model declares, else 224 x 224.
    """
    from finercam.autolayer import DEFAULT_IMAGE_SIZE, candidate_layers, declared_image_size
    from finercam.errors import AutoLayerError, ModelOutputError

    model, recommended, own_size = _layers_model(args)
    size = tuple(args.size) if args.size else own_size
    tried = size or declared_image_size(model) or DEFAULT_IMAGE_SIZE
    _check_token_count(model, tried)  # type: ignore[arg-type]
    where = f"a {tried[0]}x{tried[1]} input" + ("" if args.size else " (the model's default size)")
    try:
        candidates = candidate_layers(model, tried)  # type: ignore[arg-type]  (a dry run, for the shapes)
    except AutoLayerError:
        raise AutoLayerError(
            f"{args.model} has no candidate layer: no transformer block, and no module emits a map larger than 1x1 "
            f"on {where}. A larger --size H W may show some; 'finercam explain --layer NAME' takes any module"
        ) from None
    except ModelOutputError as error:
        cause = error.__cause__ or error
        raise ModelOutputError(
            f"the dry run of {args.model} on {where} failed ({type(cause).__name__}: {cause}); give the input size "
            "the model expects with --size H W"
        ) from None
    width = max((len(c.name) for c in candidates), default=10)
    _say(f"candidate target layers of {args.model} (dry run on {where}; * = used by target_layer='auto'):")
    for candidate in candidates:
        shape = "x".join(str(d) for d in candidate.output_shape) if candidate.output_shape else "?"
        mark = "*" if candidate.recommended else " "
        _say(f" {mark} {candidate.name:<{width}}  {candidate.kind:<22} {shape}")
    if recommended:
        _say(f"the loader recommends: {recommended}")
    return 0


def _head_metadata(backbone: LoadedBackbone, preset: str | None, weights: str | None) -> dict[str, str]:
    """What ``--head`` needs to rebuild the features: the resolved pooling and, when a preset was named, it; and
    the SHA-256 of the backbone's weights file, when one was read, so that the head is not used on other weights."""
    from finercam.fingerprint import file_fingerprint
    from finercam.models.spec import parse_spec

    metadata = {"pooling": backbone.pooling, "preprocessing": backbone.preprocess.describe()}
    if preset:
        metadata["preprocess"] = preset
    file = weights or parse_spec(backbone.spec).weights
    if file:
        metadata[BACKBONE_WEIGHTS] = str(file_fingerprint(file)["sha256"])
    return metadata


def _probe_data(args: argparse.Namespace) -> tuple[ImageFolder, ImageFolder]:
    """The training and validation splits of ``--data``, checked before the backbone is loaded.

    Raises:
        InvalidArgumentError: ``--data`` is a file, or the training split has fewer than two classes.
    """
    data = Path(args.data).expanduser()
    if data.is_file():
        raise InvalidArgumentError(
            f"--data {str(args.data)!r} is a file; train-probe needs a folder: an ImageFolder tree (one sub-folder of "
            "images per class), or a folder with train/ and val/ (or test/) trees"
        )
    train, val = train_val_folders(data, val_fraction=args.val_fraction, seed=args.seed)
    present = sorted({label for _, label in train.samples})
    if len(present) < 2:
        found = ", ".join(repr(train.classes[label]) for label in present) or "none"
        raise InvalidArgumentError(
            f"--data {str(args.data)!r} has training images of {len(present)} class ({found}); a classifier needs "
            "at least 2 classes, one sub-folder of images each"
        )
    return train, val


def _percent(value: float) -> str:
    return "n/a (no images)" if math.isnan(value) else f"{value:.1%}"


def run_probe(args: argparse.Namespace) -> int:
    """``finercam train-probe --model SPEC --data DIR --out HEAD``."""
    from finercam.models import load_backbone
    from finercam.probe import class_summary, train_probe

    train, val = _probe_data(args)
    torch.manual_seed(args.seed)
    device = resolve_device(args.device)
    backbone = load_backbone(
        args.model, weights=args.weights, preprocess=args.preprocess, pooling=args.pooling, device=device
    )
    _say(
        f"train-probe: {args.model} ({backbone.dim}-d features, {device}); {len(train.classes)} classes "
        f"({class_summary(train.classes)}); {len(train.samples)} train / {len(val.samples)} val images"
    )
    report = train_probe(
        backbone, train, val, Path(args.out),
        cache_dir=Path(args.cache), batch_size=args.batch_size,
        weight_decay=args.weight_decay, metadata=_head_metadata(backbone, args.preprocess, args.weights), log=_say,
    )
    cached = " (features from the cache)" if all(report.cached) else ""
    _say(f"features: {report.feature_seconds:.1f} s{cached}; head fitted in {report.train_seconds:.1f} s")
    _say(f"accuracy: train {_percent(report.train_accuracy)}, val {_percent(report.val_accuracy)}")
    _say(f"wrote {report.head_path}  (use it with --model {args.model} --head {report.head_path})")
    return 0
