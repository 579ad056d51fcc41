"""Loading a whole CLIP model (both towers) from a specification, for ``finercam concepts``.

==========================  ==========================================================================================
``embedded:clip``           the embedded CLIP trained on :mod:`finercam.synth` birds (default; no extra dependency)
``open_clip:ARCH[@FILE]``   an open_clip architecture (or a JSON config, or ``local-dir:DIR``) with a local checkpoint
``hf:DIR``                  a transformers ``CLIPModel`` saved with ``save_pretrained`` (its tokenizer in the same
                            folder, or ``tokenizer=DIR``)
==========================  ==========================================================================================

Nothing is downloaded. The preprocessing is the model's own; ``keep_aspect=True`` drops the centre crop (the shorter
side is resized to the model's size and each side rounded up to a multiple of the patch size), which the image towers
accept through position-embedding interpolation.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from finercam.concepts.encoders import CLIPEncoders, empty_tokenizer_size, from_embedded, from_hf, from_open_clip
from finercam.errors import InvalidArgumentError, ModelNotFoundError
from finercam.models.preprocess import Preprocess
from finercam.models.spec import parse_spec

DEFAULT_SPEC = "embedded:clip"


@dataclass(frozen=True)
class LoadedCLIP:
    """A CLIP model ready for :func:`~finercam.concepts.api.explain_concepts`.

    Attributes:
        encoders: its towers.
        preprocess: PIL image -> the model's input ``(3, H, W)``.
        display: the geometry to draw the maps on (:meth:`~finercam.models.preprocess.Preprocess.display_geometry`:
            the original image, or the model's centre crop when there is one).
        spec: the specification it was loaded from.
    """

    encoders: CLIPEncoders
    preprocess: Preprocess
    display: Preprocess
    spec: str


def _keep_aspect(preprocess: Preprocess, patch: int | None) -> Preprocess:
    size = preprocess.crop[0] if preprocess.crop is not None else preprocess.resize
    short = size if isinstance(size, int) else min(size) if size is not None else None
    return replace(preprocess, name=f"{preprocess.name}, aspect kept", resize=short, crop=None, multiple_of=patch)


def _patch(visual: torch.nn.Module) -> int | None:
    patch = getattr(visual, "patch_size", None)
    patch = getattr(getattr(visual, "config", None), "patch_size", patch)
    if isinstance(patch, tuple | list):
        patch = patch[0]
    return int(patch) if isinstance(patch, int) else None


def _embedded(name: str) -> tuple[CLIPEncoders, Preprocess]:
    from finercam.embedded.clip_model import NAME, load_embedded_clip

    if name != NAME:
        raise ModelNotFoundError(f"embedded:{name} is not a CLIP model; the embedded CLIP is embedded:{NAME}")
    clip = load_embedded_clip()
    preprocess = Preprocess("embedded:clip (shorter side to 64 px; the model normalises internally)",
                            resize=clip.image_size, interpolation="bilinear")
    return from_embedded(clip), preprocess


def _open_clip(name: str, weights: str | None, keep_aspect: bool) -> tuple[CLIPEncoders, Preprocess]:
    from finercam.models._deps import require
    from finercam.models.open_clip_loader import convert_state_dict, create_model, preprocess_of, warn_random_weights
    from finercam.models.weights import existing_file, load_into, read_state_dict

    oc = require("open_clip", "open_clip: CLIP models")
    architecture, model = create_model(oc, name)
    if weights is not None:
        file = existing_file(weights, "weights file")
        load_into(model, read_state_dict(file), f"weights file {str(weights)!r}",
                  filter_fn=lambda state, module: convert_state_dict(oc, module, state))
    warn_random_weights(architecture, name, weights, stacklevel=3)
    model.eval()
    tokenizer = oc.get_tokenizer(architecture)
    preprocess = preprocess_of(oc, architecture, model, f"open_clip:{name}")
    if keep_aspect:
        preprocess = _keep_aspect(preprocess, _patch(model.visual))
    return from_open_clip(model, tokenizer, name=f"open_clip:{name}"), preprocess


def _hf(name: str, tokenizer: str | None, keep_aspect: bool) -> tuple[CLIPEncoders, Preprocess]:
    from finercam.models._deps import quiet_loading, require
    from finercam.models.hf_loader import config_preprocess, load_config, resolve_source

    tf = require("transformers", "hf: CLIP models")
    source = resolve_source(name)
    config = load_config(tf, source, name)
    if getattr(config, "model_type", None) != "clip":
        raise InvalidArgumentError(f"hf:{name} is a {getattr(config, 'model_type', '?')} model; concepts need a "
                                   "CLIPModel with its text tower")
    with quiet_loading():
        model = tf.CLIPModel.from_pretrained(source, local_files_only=True).eval()
        try:
            text_tokenizer = tf.AutoTokenizer.from_pretrained(tokenizer or source, local_files_only=True)
        except (OSError, ValueError) as error:
            raise ModelNotFoundError(f"hf:{name}: no tokenizer in {tokenizer or source!r}: {error}") from None
    size = empty_tokenizer_size(text_tokenizer)
    if size is not None:
        where = "--tokenizer" if tokenizer else f"hf:{name}"
        raise ModelNotFoundError(
            f"{where}: no tokenizer files in {tokenizer or source!r} (transformers made an empty tokenizer of {size} "
            "tokens); pass --tokenizer DIR, a folder with the CLIP tokenizer's files (tokenizer.json, or vocab.json "
            "and merges.txt)"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a missing preprocessor_config.json falls back to CLIP's defaults
        preprocess = config_preprocess(source, name, config, "clip", None)
    if keep_aspect:
        preprocess = _keep_aspect(preprocess, _patch(model.vision_model))
    return from_hf(model, text_tokenizer, name=f"hf:{name}"), preprocess


def load_clip(spec: str = DEFAULT_SPEC, *, weights: str | Path | None = None, tokenizer: str | None = None,
              keep_aspect: bool = False, device: str | torch.device = "cpu") -> LoadedCLIP:
    """Load a CLIP model with both towers (see the module docstring for the specifications).

    Raises:
        InvalidArgumentError, ModelNotFoundError: a malformed or unknown specification, or ``weights`` /
            ``tokenizer`` for a model that does not use them.
        MissingDependencyError: open_clip or transformers is not installed.
    """
    parsed = parse_spec(spec)
    if weights is not None and parsed.kind != "open_clip":
        raise InvalidArgumentError(f"{spec!r} takes no weights=; a checkpoint is only loaded into open_clip models")
    if tokenizer is not None and parsed.kind != "hf":
        raise InvalidArgumentError(f"{spec!r} takes no tokenizer=; a tokenizer folder is only used by hf: models")
    if weights is not None and parsed.weights is not None:
        raise InvalidArgumentError(
            f"weights given twice: {spec!r} names {parsed.weights!r} and weights={str(weights)!r}; keep one"
        )
    checkpoint = str(weights) if weights is not None else parsed.weights
    if parsed.kind == "embedded":
        encoders, preprocess = _embedded(parsed.name)
    elif parsed.kind == "open_clip":
        encoders, preprocess = _open_clip(parsed.name, checkpoint, keep_aspect)
    elif parsed.kind == "hf":
        encoders, preprocess = _hf(parsed.name, tokenizer, keep_aspect)
    else:
        raise InvalidArgumentError(
            f"{spec!r}: concepts need a CLIP model with a text tower: embedded:clip, open_clip:ARCH[@FILE] or hf:DIR"
        )
    encoders.image_encoder.to(device)
    return LoadedCLIP(encoders, preprocess, preprocess.display_geometry(), spec)
