"""finercam: Finer-CAM visual explanations that spot the difference between a class and its look-alikes.

Finer-CAM (Zhang et al., CVPR 2025) explains ``y_c - gamma * agg_t y_{d_t}`` instead of ``y_c``: the evidence for the
target class ``c`` that its most similar reference classes ``d_t`` do not share.
"""

import finercam.compat  # noqa: F401  (first: a CUDA torchvision beside a CPU torch is repaired in advance)
from finercam.autolayer import LayerCandidate, auto_layer, candidate_layers
from finercam.errors import (
    AmbiguousLayoutError,
    AutoLayerError,
    FinerCAMError,
    GridInferenceError,
    InvalidArgumentError,
    InvalidTypeError,
    LayerNotFoundError,
    ModelOutputError,
    ModelShapeError,
)
from finercam.explain import FinerCAM
from finercam.layers import TokenGrid
from finercam.methods import METHODS
from finercam.objectives import AGGREGATIONS, REFERENCE_STRATEGIES
from finercam.result import CAMResult, SweepResult

__version__ = "0.1.0"

__all__ = [
    "AGGREGATIONS",
    "METHODS",
    "REFERENCE_STRATEGIES",
    "AmbiguousLayoutError",
    "AutoLayerError",
    "CAMResult",
    "FinerCAM",
    "FinerCAMError",
    "GridInferenceError",
    "InvalidArgumentError",
    "InvalidTypeError",
    "LayerCandidate",
    "LayerNotFoundError",
    "ModelOutputError",
    "ModelShapeError",
    "SweepResult",
    "TokenGrid",
    "__version__",
    "auto_layer",
    "candidate_layers",
]
