"""The web demo: ``finercam web`` serves a page that explains an uploaded image with Finer-CAM (any classifier
finercam loads) and localizes text concepts with a CLIP model, offline, with the embedded models by default.

* :mod:`finercam.web.views`: what the page shows, computed without gradio (tested on its own);
* :mod:`finercam.web.app`: the page (gradio, the ``web`` extra: ``pip install 'finercam[web]'``);
* :mod:`finercam.web.command`: the ``finercam web`` command.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

from finercam.web.views import (
    GAMMA_STRIP,
    PREDICTED,
    ConceptView,
    ExampleBird,
    ExplainView,
    ModelShelf,
    Panel,
    concept_view,
    example_birds,
    explain_view,
)

DEFAULT_MODELS: tuple[str, ...] = ("embedded:cnn", "embedded:vit")
DEFAULT_CLIP = "embedded:clip"


def model_shelf(specs: Sequence[str] = DEFAULT_MODELS, *, weights: str | Path | None = None,
                head: str | Path | None = None, preprocess: str | None = None,
                device: str = "cpu") -> ModelShelf[Any]:
    """A shelf of classifiers loaded by :func:`finercam.models.load_model` (``weights``, ``head`` and ``preprocess``
    apply to every spec: give them with one spec)."""
    from finercam.models import load_model

    return ModelShelf({spec: partial(load_model, spec, weights=weights, head=head, preprocess=preprocess,
                                     device=device) for spec in specs})


def clip_shelf(specs: Sequence[str] = (DEFAULT_CLIP,), *, device: str = "cpu") -> ModelShelf[Any]:
    """A shelf of CLIP models loaded by :func:`finercam.concepts.loading.load_clip`."""
    from finercam.concepts.loading import load_clip

    return ModelShelf({spec: partial(load_clip, spec, device=device) for spec in specs})


def build_app(models: ModelShelf[Any], clips: ModelShelf[Any] | None = None,
              examples: Sequence[ExampleBird] = ()) -> Any:
    """The demo page (a ``gradio.Blocks``): see :func:`finercam.web.app.build_app`."""
    from finercam.web.app import build_app as build

    return build(models, clips, examples)


__all__ = [
    "DEFAULT_CLIP",
    "DEFAULT_MODELS",
    "GAMMA_STRIP",
    "PREDICTED",
    "ConceptView",
    "ExampleBird",
    "ExplainView",
    "ModelShelf",
    "Panel",
    "build_app",
    "clip_shelf",
    "concept_view",
    "example_birds",
    "explain_view",
    "model_shelf",
]
