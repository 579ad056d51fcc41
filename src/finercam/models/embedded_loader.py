"""``embedded:NAME``: the small models shipped in the package (:mod:`finercam.embedded`), as loadable classifiers."""

from __future__ import annotations

from finercam.embedded import load_embedded
from finercam.errors import ModelFileNotFoundError
from finercam.models.parts import ClassifierParts
from finercam.models.preprocess import Preprocess


def load_classifier(name: str) -> ClassifierParts:
    """The embedded model ``name``; its preprocessing resizes to the training size and keeps pixels in ``[0, 1]``
    (the model normalises internally with its ``mean`` / ``std`` buffers)."""
    try:
        embedded = load_embedded(name)
    except FileNotFoundError as error:  # weights not installed: a one-line error, not a traceback
        raise ModelFileNotFoundError(str(error)) from None
    size = (embedded.image_size, embedded.image_size)
    preprocess = Preprocess(f"embedded-{embedded.name}", resize=size, interpolation="bilinear")
    return ClassifierParts(embedded.model, preprocess, embedded.class_names, embedded.target_layer)
