r"""Maps from a result store, at any comparison strength ``\gamma`` of a linear method, without the model.

For Grad-CAM, HiResCAM and XGrad-CAM the raw map is linear in the gradient, and the gradient of
``s(\gamma) = u - \gamma v`` is ``g_u - \gamma g_v``, so the raw map is affine in ``\gamma``:
``raw(\gamma) = raw_u - \gamma\, raw_v``. Two stored points determine it. With the paper's ``mean`` aggregation
``u = y_c``, so the baseline is the point ``\gamma = 0`` and one stored ``\gamma_0 > 0`` suffices:

    raw(γ) = base + (γ / γ_0) · (finer_{γ_0} − base)

(with ``softmax`` aggregation ``u`` is not ``y_c``, and two stored gammas are needed). A stored ``\gamma`` is
returned exactly as the run computed it. Layer-CAM, Grad-CAM++ and Score-CAM are not linear: only their stored
gammas can be shown. Displayable maps follow :mod:`finercam.postprocess`: ReLU, bilinear upsampling, min-max.
"""

from __future__ import annotations

import math
import numbers
import operator

from torch import Tensor

from finercam.dataset.store import StoreError
from finercam.dataset.store_reader import ResultStore
from finercam.explain import DEFAULT_GAMMA
from finercam.postprocess import normalize_maps


def anchor_points(store: ResultStore) -> list[float]:
    """The gammas whose raw maps the store determines directly (the baseline counts as ``0`` for ``mean``)."""
    points = sorted(set(store.gammas))
    if store.config.get("aggregation") == "mean" and 0.0 not in points:
        points.insert(0, 0.0)
    return points


def can_render(store: ResultStore, gamma: float) -> bool:
    """Whether :func:`finer_raw_map` can give ``gamma``: stored, or any gamma of a linear method with two points."""
    if gamma in store.gammas or (gamma == 0.0 and store.config.get("aggregation") == "mean"):
        return True
    return bool(store.config.get("linear_in_gradient")) and len(anchor_points(store)) >= 2


def _point(store: ResultStore, row: int, gamma: float) -> Tensor:
    if gamma in store.gammas:
        return store.finer_raw_maps(row)[store.gammas.index(gamma)]
    return store.baseline_raw_map(row)  # gamma == 0 with mean aggregation


def check_gamma(store: ResultStore, gamma: object) -> float:
    """``gamma`` as a float, when the store can give its maps (:func:`can_render`); views call this before any work.

    Raises:
        StoreError: ``gamma`` is not a number >= 0, or it is not stored and the method is not linear in the gradient
            (or only one point is stored), so it would need the model.
    """
    if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real) or not math.isfinite(gamma) or gamma < 0:
        raise StoreError(f"gamma must be a finite number >= 0; got {gamma!r}")
    gamma = float(gamma)
    if not can_render(store, gamma):
        why = (
            f"{store.method} is not linear in the gradient" if not store.config.get("linear_in_gradient")
            else "the store holds a single point of the line raw(gamma)"
        )
        raise StoreError(
            f"gamma {gamma!r} is not in the store (gammas {list(store.gammas)}) and {why}: re-run with --gammas "
            f"including {gamma!r}"
        )
    return gamma


def _check_row(store: ResultStore, row: object) -> None:
    """A row must be a whole number (an ``int``, a NumPy or 0-d torch integer) of the store's range."""
    try:
        index = None if isinstance(row, bool) else operator.index(row)  # type: ignore[arg-type]
    except TypeError:
        index = None
    if index is None or not 0 <= index < len(store.input_sizes):
        raise StoreError(f"row {row!r} is not in the store: rows go from 0 to {len(store.input_sizes) - 1}")


def finer_raw_map(store: ResultStore, row: int, gamma: float) -> Tensor:
    r"""The signed ``(h, w)`` raw map of ``s = y_c - \gamma\,\mathrm{agg}_t\, y_{d_t}`` for one row.

    Raises:
        StoreError: ``gamma`` is not stored and the method is not linear in the gradient (or only one point is
            stored), so it would need the model.
    """
    gamma = check_gamma(store, gamma)
    _check_row(store, row)
    if gamma in store.gammas or (gamma == 0.0 and store.config.get("aggregation") == "mean"):
        return _point(store, row, gamma)
    points = anchor_points(store)
    low, high = points[0], points[-1]
    first, last = _point(store, row, low), _point(store, row, high)
    return first + ((gamma - low) / (high - low)) * (last - first)


def render_map(store: ResultStore, row: int, gamma: float, size: tuple[int, int] | None = None) -> Tensor:
    """The displayable ``(H, W)`` Finer-CAM map in ``[0, 1]`` at ``size`` (default: the model's input size)."""
    _check_row(store, row)
    target = size if size is not None else tuple(store.input_sizes[row].tolist())
    return normalize_maps(finer_raw_map(store, row, gamma), target)  # type: ignore[arg-type]


def render_baseline(store: ResultStore, row: int, size: tuple[int, int] | None = None) -> Tensor:
    """The displayable ``(H, W)`` base CAM (explaining ``y_c`` alone) in ``[0, 1]``."""
    _check_row(store, row)
    target = size if size is not None else tuple(store.input_sizes[row].tolist())
    return normalize_maps(store.baseline_raw_map(row), target)  # type: ignore[arg-type]


def default_gamma(store: ResultStore) -> float:
    """The gamma shown by default: the paper's 0.6 when stored, else the first stored gamma > 0."""
    if DEFAULT_GAMMA in store.gammas:
        return DEFAULT_GAMMA
    nonzero = [gamma for gamma in store.gammas if gamma > 0]
    return nonzero[0] if nonzero else store.gammas[0]
