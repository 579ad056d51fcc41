r"""Base CAM methods: each turns activations ``A`` ``(B, K, h, w)`` and gradients ``g = \partial s / \partial A``
into a signed raw map ``(B, h, w)`` before the ReLU.

Every gradient function accepts ``g`` with extra leading dimensions ``(..., B, K, h, w)`` (a stack of objectives or of
``\gamma`` values) and returns ``(..., B, h, w)``. Methods that are linear in ``g`` (Grad-CAM, HiResCAM, XGrad-CAM)
give the raw map of any ``\gamma`` as ``raw(g_u) - \gamma\, raw(g_v)``; the others are evaluated on
``g(\gamma) = g_u - \gamma g_v``. Score-CAM needs forward passes of masked inputs and lives in
:mod:`finercam.scorecam`; it is registered here with ``uses_gradients=False``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from finercam.errors import InvalidArgumentError, InvalidTypeError

GradientMethod = Callable[[Tensor, Tensor], Tensor]

XGRADCAM_EPS = 1e-7
GRADCAM_PLUSPLUS_EPS = 1e-6


@dataclass(frozen=True)
class CAMMethod:
    """A registered base CAM method.

    Attributes:
        name: registry key (``"gradcam"``).
        title: display name (``"Grad-CAM"``).
        uses_gradients: whether it needs ``g``; ``False`` for Score-CAM.
        linear_in_gradient: whether ``raw(a g_1 + b g_2) = a raw(g_1) + b raw(g_2)``.
        compute: ``(A, g) -> raw`` for gradient methods; ``None`` for Score-CAM.
    """

    name: str
    title: str
    uses_gradients: bool
    linear_in_gradient: bool
    compute: GradientMethod | None


METHODS: dict[str, CAMMethod] = {}


def register(name: str, title: str, *, linear_in_gradient: bool) -> Callable[[GradientMethod], GradientMethod]:
    """Register a gradient-based CAM function under ``name``."""

    def decorate(function: GradientMethod) -> GradientMethod:
        METHODS[name] = CAMMethod(name, title, True, linear_in_gradient, function)
        return function

    return decorate


def _weighted_sum(weights: Tensor, activations: Tensor) -> Tensor:
    """``sum_k w_k A_k`` with weights ``(..., B, K)`` and activations ``(B, K, h, w)``."""
    return torch.einsum("...bk,bkhw->...bhw", weights, activations)


@register("gradcam", "Grad-CAM", linear_in_gradient=True)
def gradcam(activations: Tensor, gradients: Tensor) -> Tensor:
    r"""Grad-CAM: ``w_k = \frac{1}{hw}\sum_{ij} g_k^{ij}``, map ``\sum_k w_k A_k``."""
    return _weighted_sum(gradients.mean(dim=(-2, -1)), activations)


@register("hirescam", "HiResCAM", linear_in_gradient=True)
def hirescam(activations: Tensor, gradients: Tensor) -> Tensor:
    r"""HiResCAM: ``\sum_k g_k \odot A_k``."""
    return (gradients * activations).sum(dim=-3)


@register("xgradcam", "XGrad-CAM", linear_in_gradient=True)
def xgradcam(activations: Tensor, gradients: Tensor) -> Tensor:
    r"""XGrad-CAM: ``w_k = \sum_{ij} g_k^{ij} A_k^{ij} / (\sum_{ij} A_k^{ij} + \epsilon)``."""
    totals = activations.sum(dim=(-2, -1))
    weights = (gradients * activations).sum(dim=(-2, -1)) / (totals + XGRADCAM_EPS)
    return _weighted_sum(weights, activations)


@register("gradcam++", "Grad-CAM++", linear_in_gradient=False)
def gradcam_plusplus(activations: Tensor, gradients: Tensor) -> Tensor:
    r"""Grad-CAM++ (Chattopadhay et al., Eq. 19): ``\alpha = g^2 / (2 g^2 + \sum_{ij} A \cdot g^3 + \epsilon)``
    (zero where ``g = 0``), ``w_k = \sum_{ij} \alpha\, \mathrm{ReLU}(g_k)``."""
    squared = gradients.square()
    totals = activations.sum(dim=(-2, -1), keepdim=True)
    alpha = squared / (2 * squared + totals * squared * gradients + GRADCAM_PLUSPLUS_EPS)
    alpha = torch.where(gradients != 0, alpha, torch.zeros_like(alpha))
    weights = (alpha * gradients.clamp(min=0)).sum(dim=(-2, -1))
    return _weighted_sum(weights, activations)


@register("layercam", "Layer-CAM", linear_in_gradient=False)
def layercam(activations: Tensor, gradients: Tensor) -> Tensor:
    r"""Layer-CAM: ``\sum_k \mathrm{ReLU}(g_k) \odot A_k``."""
    return (gradients.clamp(min=0) * activations).sum(dim=-3)


METHODS["scorecam"] = CAMMethod("scorecam", "Score-CAM", False, False, None)


def get_method(name: str) -> CAMMethod:
    """Look up a method by name (case-insensitive; ``-`` and ``_`` ignored, ``gradcampp`` is ``gradcam++``)."""
    if not isinstance(name, str):
        raise InvalidTypeError(f"method must be a name, one of {sorted(METHODS)}; got {type(name).__name__} {name!r}")
    key = name.lower().replace("-", "").replace("_", "")
    key = {"gradcampp": "gradcam++", "gradcamplusplus": "gradcam++"}.get(key, key)
    method = METHODS.get(key)
    if method is None:
        raise InvalidArgumentError(f"unknown CAM method {name!r}; use one of {sorted(METHODS)}")
    return method
