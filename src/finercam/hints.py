"""Advice in error messages, written for the Python API (``target_layer=``, ``reshape=``, ``weights=FILE``), put in
the terms of the interface the user is in: the command line's options or the web page's boxes.

The engine and loaders phrase their advice for Python callers; :func:`command_line_hints` and :func:`page_hints`
rewrite it, so that nobody is told to pass a keyword argument they cannot pass.
"""

from __future__ import annotations

from dataclasses import dataclass

_API_HINTS = (
    ("All layer names: model.named_modules().", "List the layers with: finercam layers {model}."),
    ("Pick a spatial layer (see finercam.autolayer.candidate_layers) or pass reshape= a callable returning "
     "(B, K, h, w).", "Pick a spatial layer (list them with: finercam layers {model})."),
    ("Pass image_size= (the size the model expects) or target_layer= explicitly.",
     "Give {layer} (list the layers with: finercam layers {model}) or {preprocess} the model accepts."),
    ("Pass target_layer= explicitly (all names: model.named_modules()).",
     "Give {layer} (list the layers with: finercam layers {model})."),
)
"""Advice written for the Python API, and what an interface says instead (``{model}``: the model's spec; ``{layer}``
and ``{preprocess}``: where the interface takes a layer and a preprocessing)."""
_ARGUMENT_HINTS = (
    ("(--head / head=)", "(--head)"),
    ("pass weights=FILE", "give --weights FILE"),
    ("weights=FILE", "--weights FILE"),
    ("head=FILE", "--head FILE"),
)
"""Keyword arguments of the loaders named in messages, and the command line's options for them."""


@dataclass(frozen=True)
class Terms:
    """How an interface names the layer and preprocessing it takes."""

    layer: str
    preprocess: str


COMMAND_LINE = Terms(layer="--layer", preprocess="a --preprocess")
PAGE = Terms(layer="a layer in the layer box", preprocess="a --preprocess (when starting finercam web)")
_PAGE_OPTIONS = (("--versus", "the versus box"), ("--target", "the class box"),
                 ("--references", "the references choice"))
"""The ``explain`` options named in messages, and the page's boxes for them."""


def argument_hints(message: str) -> str:
    """A message with the loaders' keyword arguments (``weights=FILE``, ``head=FILE``) named as options."""
    for api, cli in _ARGUMENT_HINTS:
        message = message.replace(api, cli)
    return message


def api_hints(message: str, model: str | None, terms: Terms = COMMAND_LINE) -> str:
    """A message with its Python-API advice (``target_layer=``, ``reshape=``) put in ``terms``; ``model`` is the
    model's spec (``MODEL`` when unknown)."""
    for api, advice in _API_HINTS:
        message = message.replace(api, advice.format(model=model or "MODEL", layer=terms.layer,
                                                     preprocess=terms.preprocess))
    return message


def command_line_hints(message: str, model: str | None) -> str:
    """An error message in the command line's terms."""
    return argument_hints(api_hints(message, model, COMMAND_LINE))


def page_hints(message: str, model: str | None) -> str:
    """An error message phrased for the command line or the Python API in the web page's terms."""
    message = api_hints(message, model, PAGE)
    for option, box in _PAGE_OPTIONS:
        message = message.replace(option, box)
    return message
