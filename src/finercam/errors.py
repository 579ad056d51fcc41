"""Exceptions raised by finercam.

Every error names the bad value and what would be accepted. They subclass the built-in exception a caller would
expect (``ValueError``, ``TypeError``, ``LookupError``), so ``except ValueError`` keeps working.
"""

from __future__ import annotations


class FinerCAMError(Exception):
    """Base class of all finercam errors."""


class InvalidArgumentError(FinerCAMError, ValueError):
    """An argument has a value finercam cannot use."""


class InvalidTypeError(FinerCAMError, TypeError):
    """An argument has a type finercam cannot use."""


class LayerNotFoundError(FinerCAMError, LookupError):
    """A target layer name does not exist in the model."""


class ModelOutputError(FinerCAMError, RuntimeError):
    """The model produced something finercam cannot interpret as class logits or layer activations."""


class ModelShapeError(InvalidArgumentError):
    """A layer's activations cannot be arranged as maps ``(B, K, h, w)``."""
