"""Model specifications: the strings that name a model, such as ``timm:resnet50`` or ``hf:./my-vit``.

========================  ==========================================================================================
``torchvision:NAME``      a torchvision architecture; random weights unless ``weights=`` (or ``NAME@FILE``)
``timm:NAME``             a timm architecture; pretrained weights from the local HF / torch hub cache when present,
                          else ``weights=`` / ``NAME@FILE``, else random weights (with a warning)
``hf:ID_OR_DIR``          a transformers model from a local directory (``save_pretrained``) or the local HF cache
``open_clip:ARCH``        an open_clip architecture (or ``local-dir:DIR``, or a JSON config file) with a local
                          checkpoint given as ``ARCH@FILE`` or ``weights=``; the image tower is the backbone
``torchscript:FILE``      a TorchScript archive (``torch.jit.save``)
``python:FILE.py:FUNC``   ``FUNC()`` from a Python file, returning an ``nn.Module``
``embedded:NAME``         a model shipped in the package (``cnn``, ``vit``), trained on :mod:`finercam.synth` birds
========================  ==========================================================================================
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path

from finercam.errors import InvalidArgumentError, ModelNotFoundError

KINDS = ("torchvision", "timm", "hf", "open_clip", "torchscript", "python", "embedded")
_ALIASES = {
    "tv": "torchvision",
    "huggingface": "hf",
    "transformers": "hf",
    "openclip": "open_clip",
    "open-clip": "open_clip",
    "jit": "torchscript",
    "ts": "torchscript",
    "py": "python",
}
_FORMS = (
    "torchvision:NAME, timm:NAME, hf:ID_OR_DIR, open_clip:ARCH[@CHECKPOINT], torchscript:FILE, python:FILE.py:FUNC, "
    "embedded:cnn"
)


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model specification.

    Attributes:
        kind: one of :data:`KINDS`.
        name: the architecture, hub id, directory or file.
        weights: a checkpoint given inline as ``NAME@FILE`` (torchvision, timm, open_clip), else ``None``.
        factory: the function name of a ``python:`` spec, else ``None``.
        text: the specification as given.
    """

    kind: str
    name: str
    weights: str | None = None
    factory: str | None = None
    text: str = ""


def parse_spec(spec: str) -> ModelSpec:
    """Parse ``KIND:REST`` into a :class:`ModelSpec`.

    Raises:
        InvalidArgumentError: the string is empty or malformed.
        ModelNotFoundError: the kind is unknown; the message lists the kinds.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise InvalidArgumentError(f"model spec must be a non-empty string such as 'timm:resnet50'; got {spec!r}")
    text = spec.strip()
    kind, sep, rest = text.partition(":")
    kind = _ALIASES.get(kind.lower(), kind.lower())
    if not sep or len(kind) == 1:  # no kind, or a Windows drive letter
        guess = "torchscript" if Path(text).suffix in (".pt", ".pth", ".ts", ".jit") else "timm"
        raise InvalidArgumentError(
            f"model spec {text!r} does not start with a kind; write KIND:NAME with KIND one of {list(KINDS)} "
            f"(forms: {_FORMS}), e.g. '{guess}:{text}'"
        )
    if kind not in KINDS:
        close = difflib.get_close_matches(kind, KINDS, n=1, cutoff=0.5)
        hint = f"; did you mean '{close[0]}:{rest}'?" if close else ""
        raise ModelNotFoundError(f"unknown model kind {kind!r} in {text!r}; known kinds: {list(KINDS)}{hint}")
    if not rest:
        raise InvalidArgumentError(f"model spec {text!r} names no model after '{kind}:'; forms: {_FORMS}")

    if kind == "python":
        file, sep, factory = rest.rpartition(":")
        if not sep or not factory.isidentifier() or not file:
            raise InvalidArgumentError(
                f"model spec {text!r}: a python spec is python:FILE.py:FUNCTION, where FUNCTION() returns the "
                "nn.Module (e.g. python:models/mine.py:build)"
            )
        return ModelSpec(kind, file, factory=factory, text=text)
    if kind in ("torchvision", "timm", "open_clip") and "@" in rest:
        name, _, weights = rest.partition("@")
        if not name or not weights:
            raise InvalidArgumentError(f"model spec {text!r}: write {kind}:NAME@/path/to/checkpoint")
        return ModelSpec(kind, name, weights=weights, text=text)
    return ModelSpec(kind, rest, text=text)
