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


class GridInferenceError(ModelShapeError):
    """No token grid or map layout fits a layer's activations and the input size (``reshape="auto"``)."""


class AmbiguousLayoutError(GridInferenceError):
    """Several token grids or map layouts fit a layer's activations equally well; an explicit reshape is needed."""


class AutoLayerError(LayerNotFoundError):
    """``target_layer="auto"`` found no transformer block and no spatial layer in the model."""


class MissingDependencyError(FinerCAMError, ImportError):
    """An optional dependency is not installed; the message names the ``pip install finercam[...]`` extra."""


class ModelNotFoundError(FinerCAMError, LookupError):
    """A model name, model kind or hub id is unknown or not available locally; the message lists close names."""


class ModelFileNotFoundError(FinerCAMError, FileNotFoundError):
    """A weights, head, checkpoint or model file does not exist."""


class WeightsError(InvalidArgumentError):
    """A weights or head file cannot be used: wrong shapes or keys, not a state dict, or unsafe to unpickle."""


class ModelLoadError(FinerCAMError, RuntimeError):
    """Building a model failed for a reason other than the above, e.g. a user factory raised."""


class RandomWeightsWarning(UserWarning):
    """A model was built with random weights because no pretrained weights were found locally."""
