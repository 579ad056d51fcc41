"""``finercam concepts IMAGE --concept "red beak" --versus "bird"``: localize a text concept with a CLIP model.

Prints the cosine similarity of the image with the concept and each reference, writes a labelled figure (image,
plain concept map, Finer-CAM contrast) and the maps (safetensors: ``concept_map`` and ``contrast_map`` at the size
of the figure's image, the signed ``concept_raw_map`` / ``contrast_raw_map`` at layer resolution, and
``similarities``; the prompts, templates, gamma, layer, model and preprocessing in the metadata). The figure's image is
the whole image (longest side at most 1000 px) unless the model's preprocessing crops it: then it is the model's
centre crop, the only part the maps can cover.

Wired into :mod:`finercam.cli` by ``add_commands(commands)`` and ``dispatch(args)``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from finercam.argtypes import FIGURE_SUFFIXES
from finercam.argtypes import gamma as _gamma
from finercam.argtypes import positive_int as _positive_int

COMMAND = "concepts"
DEFAULT_OUT = Path("finercam-out")


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``concepts`` on the ``finercam`` command line's sub-parsers."""
    from finercam.cli import figure_path
    from finercam.methods import METHODS

    parser = subparsers.add_parser(
        COMMAND,
        help="localize a text concept with a CLIP model, alone and contrasted with reference prompts",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    parser.add_argument("image", help="the image file")
    parser.add_argument("--concept", required=True, help="the concept prompt, e.g. 'red beak'")
    parser.add_argument("--versus", action="append", default=[], metavar="PROMPT",
                        help="a reference prompt, e.g. 'bird' (repeat for several: their logits are averaged)")
    parser.add_argument("--siblings", metavar="VALUES",
                        help="references made by swapping the concept's attribute word for each of these comma-"
                             "separated values, e.g. 'red,blue,black' turns 'red wing' into 'blue wing', 'black wing'")
    parser.add_argument("--nearest", type=_positive_int, metavar="K",
                        help="the K prompts of --candidates closest to the concept in text-embedding space")
    parser.add_argument("--candidates", nargs="+", metavar="PROMPT", help="candidate prompts for --nearest")
    parser.add_argument("--model", default="embedded:clip",
                        help="embedded:clip (default), open_clip:ARCH[@CHECKPOINT] or hf:DIR (a CLIPModel)")
    parser.add_argument("--weights", help="checkpoint for an open_clip model")
    parser.add_argument("--tokenizer", help="tokenizer folder for hf: (default: the model's folder)")
    parser.add_argument("--template", action="append", dest="templates", metavar="TEMPLATE",
                        help="a prompt template with {} (repeat to ensemble; default: the model's)")
    parser.add_argument("--gamma", type=_gamma, default=0.6, help="comparison strength (default 0.6)")
    parser.add_argument("--method", default="gradcam", choices=sorted(METHODS))
    parser.add_argument("--layer",
                        help="a layer of the image tower, e.g. stage3 or visual.transformer.resblocks.11.ln_1 "
                             "(default: auto; an unknown name lists the tower's candidate layers)")
    parser.add_argument("--keep-aspect", action="store_true",
                        help="no centre crop: the whole image at its aspect ratio (position embeddings interpolated)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when present)")
    parser.add_argument("--out", type=figure_path,
                        help=f"figure to write ({', '.join(FIGURE_SUFFIXES)}; no suffix writes .png), or a folder to "
                             "put it in (default: ./finercam-out/<image>.concepts.png); the maps go beside it as "
                             "<figure stem>.safetensors")


def _references(args: argparse.Namespace) -> object:
    from finercam.concepts.references import Nearest, Siblings
    from finercam.errors import InvalidArgumentError

    given = [bool(args.versus), args.siblings is not None, args.nearest is not None]
    if sum(given) != 1:
        raise InvalidArgumentError(
            "give the references one way: --versus PROMPT (repeatable), --siblings VALUES, or --nearest K with "
            "--candidates PROMPT ..." + (" (several were given)" if sum(given) > 1 else "")
        )
    if args.siblings is not None:
        return Siblings(tuple(value.strip() for value in args.siblings.split(",")))
    if args.nearest is not None:
        if not args.candidates:
            raise InvalidArgumentError("--nearest K needs --candidates PROMPT [PROMPT ...] to choose from")
        return Nearest(tuple(args.candidates), args.nearest)
    if args.candidates:
        raise InvalidArgumentError("--candidates is only used with --nearest K")
    return list(args.versus)


def _check_model_options(args: argparse.Namespace) -> None:
    """Refuse --weights and --tokenizer where the model kind does not use them (rather than ignore them)."""
    from finercam.errors import InvalidArgumentError
    from finercam.models.spec import parse_spec

    kind = parse_spec(args.model).kind
    if args.weights is not None and kind != "open_clip":
        reason = "it ships its own weights" if kind == "embedded" else "it loads its weights from its own folder"
        raise InvalidArgumentError(
            f"--weights is only used with open_clip: models; {args.model} takes none ({reason}): leave it out"
        )
    if args.tokenizer is not None and kind != "hf":
        raise InvalidArgumentError(
            f"--tokenizer is only used with hf: models; {args.model} has its own tokenizer: leave it out"
        )


TOWER = "image_encoder"
"""The image tower's name inside the zero-shot classifier."""


def _classifier_layer(name: str | None) -> str:
    """``--layer`` names a layer of the image tower (``stage3``); ``image_encoder.stage3`` is accepted too."""
    if not name:
        return "auto"
    return name if name.startswith(f"{TOWER}.") else f"{TOWER}.{name}"


def _tower_layers(image_encoder: torch.nn.Module, pixels: torch.Tensor) -> str:
    """The image tower's candidate layers, as ``--layer`` takes them, for an error message."""
    from finercam.autolayer import candidate_layers
    from finercam.errors import FinerCAMError

    try:
        candidates = candidate_layers(image_encoder, example=pixels[None])
    except FinerCAMError:
        return ""
    names = [c.name + (" (the default)" if c.recommended else "") for c in candidates]
    return f" Layers of the image tower for --layer: {', '.join(names)}." if names else ""


CONCEPT_MAPS = "finercam-concept-maps"


def _say(line: str) -> None:
    print(line, flush=True)


def run_concepts(args: argparse.Namespace) -> int:
    """``finercam concepts IMAGE --concept C --versus D``; raises finercam errors."""
    from safetensors.torch import save_file

    from finercam.cli import MAPS_FORMAT, figure_file, maps_file
    from finercam.concepts.api import explain_concepts
    from finercam.concepts.figure import save_concept_figure, versus_label
    from finercam.concepts.loading import load_clip
    from finercam.errors import InvalidArgumentError, LayerNotFoundError
    from finercam.images import load_image
    from finercam.runtime import resolve_device

    if not args.concept.strip():
        raise InvalidArgumentError("--concept is empty; give a text such as 'red beak'")
    versus = _references(args)
    _check_model_options(args)
    out = figure_file(args.out, f"{Path(args.image).stem}.concepts.png", DEFAULT_OUT, inputs=[args.image])
    maps_path = maps_file(out, CONCEPT_MAPS, legacy_key="concept")
    image = load_image(args.image)
    device = resolve_device(args.device)
    loaded = load_clip(args.model, weights=args.weights, tokenizer=args.tokenizer, keep_aspect=args.keep_aspect,
                       device=device)
    pixels = loaded.preprocess(image).to(device)
    try:
        explanation = explain_concepts(
            loaded.encoders, pixels, args.concept, versus, gamma=args.gamma, templates=args.templates,
            method=args.method, target_layer=_classifier_layer(args.layer),
        )
    except LayerNotFoundError as error:
        message = str(error).replace(" All layer names: model.named_modules().", "")
        raise LayerNotFoundError(message + _tower_layers(loaded.encoders.image_encoder, pixels)) from error
    display = loaded.display(image)
    _say(f"model: {args.model}   layer: {explanation.layer}   method: {args.method}   input: {tuple(pixels.shape)}")
    similarities = explanation.similarities[0].tolist()
    _say(f"concept:  {explanation.concept!r}  cos {similarities[0]:.3f}")
    for prompt, value in zip(explanation.versus, similarities[1:], strict=True):
        _say(f"versus:   {prompt!r}  cos {value:.3f}")
    _say(f"contrast: {versus_label(explanation)}")
    if float(explanation.contrast_raw_maps.max()) <= 0:
        _say("the contrast map is negative everywhere: the concept adds nothing the references lack")
    figure = save_concept_figure(out, display, explanation)
    size = tuple(display.shape[-2:])

    def at_display(maps: torch.Tensor) -> torch.Tensor:
        return F.interpolate(maps[:, None].float().cpu(), size=size, mode="bilinear", align_corners=False)[0, 0]

    save_file({
        "concept_map": at_display(explanation.concept_maps).contiguous(),
        "contrast_map": at_display(explanation.contrast_maps).contiguous(),
        "concept_raw_map": explanation.concept_raw_maps[0].float().cpu().contiguous(),
        "contrast_raw_map": explanation.contrast_raw_maps[0].float().cpu().contiguous(),
        "similarities": explanation.similarities[0].float().cpu().contiguous(),
    }, str(maps_path), metadata={
        MAPS_FORMAT: CONCEPT_MAPS, "concept": explanation.concept, "versus": json.dumps(list(explanation.versus)),
        "gamma": str(explanation.gamma), "layer": explanation.layer, "method": args.method, "model": args.model,
        "templates": json.dumps(list(args.templates or loaded.encoders.templates)),
        "preprocess": loaded.preprocess.name, "keep_aspect": str(args.keep_aspect), "image": str(args.image),
        "maps_on": "the model's centre crop" if loaded.preprocess.crop is not None else "the whole image",
        "maps_size": json.dumps(list(size)),
    })
    _say(f"wrote {figure} and {maps_path}")
    return 0


def dispatch(args: argparse.Namespace) -> int:
    """Run the ``concepts`` command from parsed arguments (:func:`finercam.cli.main` prints user errors as one
    line); returns the exit status."""
    return run_concepts(args)
