r"""What Finer-CAM explains: the target class ``c``, its reference classes ``d_1..d_T`` and the contrastive score.

Finer-CAM explains

.. math:: s = y_c - \gamma \,\mathrm{agg}_t\, y_{d_t}, \qquad \gamma \ge 0,

instead of ``y_c``. Both aggregations are affine in ``\gamma``: :func:`contrast_terms` returns ``(u, v)`` with
``s(\gamma) = u - \gamma v``, so one pair of gradients (or one set of Score-CAM forwards) serves every ``\gamma``.

* ``mean`` (paper Eq. 8, default): ``u = y_c``, ``v = (1/T) \sum_t y_{d_t}``.
* ``softmax`` (official ``FinerWeightedTarget``): ``s = \sum_t p_t (y_c - \gamma y_{d_t}) / (\sum_t p_t + 10^{-9})``
  with ``p = softmax(y)`` over all classes and **not detached**, so gradients also flow through ``p``.

Reference strategies live in a registry (:data:`REFERENCE_STRATEGIES`); the target is never its own reference.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from finercam.errors import InvalidArgumentError, InvalidTypeError

AGGREGATIONS = ("mean", "softmax")
SOFTMAX_EPS = 1e-9

Targets = Tensor | int | Sequence[int] | None
ClassifierWeights = Tensor | nn.Module
ReferenceStrategy = Callable[[Tensor, Tensor, int, "Tensor | None"], Tensor]
REFERENCE_STRATEGIES: dict[str, ReferenceStrategy] = {}


def reference_strategy(name: str) -> Callable[[ReferenceStrategy], ReferenceStrategy]:
    """Register a reference strategy ``(logits, targets, T, classifier_weights) -> (B, T) class indices``."""

    def register(function: ReferenceStrategy) -> ReferenceStrategy:
        REFERENCE_STRATEGIES[name] = function
        return function

    return register


def _is_integer(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _as_index(classes: Tensor, device: torch.device) -> Tensor:
    """Class indices as a long tensor on ``device``; a tensor made under ``torch.inference_mode()`` (e.g. the argmax
    of a prediction made there) is copied, since autograd cannot save inference tensors for the backward pass."""
    indices = classes.to(device=device, dtype=torch.long)
    return indices.clone() if indices.is_inference() else indices


def _scalar(value: object) -> object:
    """A 0-d integer tensor or array as a Python int; anything else as it is (checked by the caller)."""
    if isinstance(value, Tensor) or (hasattr(value, "__array__") and not isinstance(value, Sequence)):
        tensor = torch.as_tensor(value)  # type: ignore[arg-type]
        if tensor.ndim == 0 and not (tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool):
            return int(tensor)
    return value


def _check_classes(indices: Tensor, num_classes: int, what: str) -> None:
    bad = (indices < 0) | (indices >= num_classes)
    if bool(bad.any()):
        position = tuple(int(i) for i in bad.nonzero()[0])
        value = int(indices[position])
        raise InvalidArgumentError(
            f"{what} {value} at position {position} is not a class of this model: it has {num_classes} classes, "
            f"so classes are 0..{num_classes - 1}"
        )


def resolve_targets(targets: Targets, logits: Tensor) -> Tensor:
    """Per-image target classes ``c`` as a ``(B,)`` long tensor on the logits' device.

    Args:
        targets: ``None`` (the top prediction), one ``int`` for every image, or one class per image as a sequence
            or a 1-D integer tensor.
        logits: the class scores ``(B, C)``.
    """
    batch, num_classes = logits.shape
    if targets is None:
        return logits.detach().argmax(dim=1)
    if hasattr(targets, "__array__") and not isinstance(targets, Tensor | Sequence):  # a NumPy array or scalar
        targets = torch.as_tensor(targets)  # type: ignore[arg-type]
    elif isinstance(targets, Sequence) and not isinstance(targets, str | bytes):
        targets = [_scalar(t) for t in targets]  # 0-d tensors and NumPy integers count as ints
    if _is_integer(targets):
        resolved = torch.full((batch,), int(targets), dtype=torch.long, device=logits.device)  # type: ignore[arg-type]
    elif isinstance(targets, Tensor):
        if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
            raise InvalidTypeError(f"targets must hold integer class indices; got a tensor of dtype {targets.dtype}")
        if targets.ndim == 0:
            targets = targets.expand(batch)
        if targets.ndim != 1 or targets.shape[0] != batch:
            raise InvalidArgumentError(
                f"targets has shape {tuple(targets.shape)}, but the batch has {batch} images; give one class per "
                f"image (shape ({batch},)), one int for all, or None for the top prediction"
            )
        resolved = _as_index(targets, logits.device)
    elif isinstance(targets, Sequence) and not isinstance(targets, str):
        if not all(_is_integer(t) for t in targets):
            raise InvalidTypeError(f"targets must be integer class indices; got {list(targets)!r}")
        if len(targets) != batch:
            raise InvalidArgumentError(
                f"targets has {len(targets)} entries, but the batch has {batch} images; give one class per image, "
                "one int for all, or None for the top prediction"
            )
        resolved = torch.tensor([int(t) for t in targets], dtype=torch.long, device=logits.device)
    else:
        raise InvalidTypeError(
            f"targets must be None, an int, a sequence of ints or an integer tensor; got {type(targets).__name__}"
        )
    _check_classes(resolved, num_classes, "target class")
    return resolved


ClassSets = int | Tensor | Sequence[int] | Sequence[Sequence[int]]


def resolve_class_sets(classes: ClassSets, logits: Tensor) -> Tensor:
    """The ``(B, K)`` classes to explain per image for :meth:`finercam.FinerCAM.explain_classes`.

    Args:
        classes: an int ``K`` (each image's ``K`` top predictions, best first), a list of ``K`` classes for every
            image, a list of ``B`` lists of ``K`` classes, or a ``(B, K)`` integer tensor.
        logits: the class scores ``(B, C)``.
    """
    batch, num_classes = logits.shape
    if _is_integer(_scalar(classes)):
        count = int(_scalar(classes))  # type: ignore[call-overload]
        if not 1 <= count <= num_classes:
            raise InvalidArgumentError(
                f"classes={count} asks for the top {count} predictions, but the model has {num_classes} classes; "
                f"give 1..{num_classes}, or the classes themselves"
            )
        return logits.detach().float().topk(count, dim=1).indices
    if hasattr(classes, "__array__") and not isinstance(classes, Tensor):
        classes = torch.as_tensor(classes)  # type: ignore[arg-type]
    if isinstance(classes, Sequence) and not isinstance(classes, str | bytes):
        rows = [[_scalar(c) for c in row] if isinstance(row, Sequence) else _scalar(row) for row in classes]
        if rows and all(_is_integer(row) for row in rows):
            rows = [rows] * batch  # the same classes for every image
        if not rows or not all(isinstance(row, list) and row and all(_is_integer(c) for c in row) for row in rows):
            raise InvalidTypeError(
                f"classes must be an int K (top-K predictions), a list of classes, a list of {batch} lists of "
                f"classes or a (B, K) integer tensor; got {classes!r}"
            )
        if len(rows) != batch or len({len(row) for row in rows}) != 1:  # type: ignore[arg-type]
            raise InvalidArgumentError(
                f"classes gives {len(rows)} lists of lengths {sorted({len(row) for row in rows})}; expected {batch} "  # type: ignore[arg-type]
                "lists (one per image) of the same length K, or one list for every image"
            )
        classes = torch.tensor(rows, dtype=torch.long)
    if not isinstance(classes, Tensor):
        raise InvalidTypeError(
            f"classes must be an int, a list of classes or a (B, K) integer tensor; got {type(classes).__name__}"
        )
    if classes.is_floating_point() or classes.is_complex() or classes.dtype == torch.bool:
        raise InvalidTypeError(f"classes must hold integer class indices; got a tensor of dtype {classes.dtype}")
    if classes.ndim == 1:
        classes = classes[None].expand(batch, -1)
    if classes.ndim != 2 or classes.shape[0] != batch or classes.shape[1] < 1:
        raise InvalidArgumentError(
            f"classes has shape {tuple(classes.shape)}; expected (B, K) = ({batch}, K) with K >= 1, or (K,) for "
            "every image"
        )
    resolved = _as_index(classes, logits.device)
    _check_classes(resolved, num_classes, "class")
    return resolved


def _ranked_excluding_target(
    keys: Tensor, targets: Tensor, count: int, logits: Tensor, *, descending: bool
) -> Tensor:
    """The ``count`` classes ranked first by ``keys`` (B, C), never the target; ties broken by class index.

    The target is removed by index (not by an extreme key, which other classes may share, e.g. masked classes at
    ``-inf``); undefined keys (NaN, e.g. ``inf - inf``) rank last. A class whose logit is not finite (a class the
    model masks with ``-inf``) is never a reference: where fewer finite classes remain than ``count``, the row is
    padded with ``-1``.
    """
    worst = float("-inf") if descending else float("inf")
    valid = logits.detach().isfinite()
    keys = keys.detach().nan_to_num(nan=worst, posinf=None, neginf=None).masked_fill(~valid, worst)
    order = torch.sort(keys, dim=1, descending=descending, stable=True).indices
    others = order[order != targets[:, None]].view(order.shape[0], order.shape[1] - 1)[:, :count]
    return others.masked_fill(~valid.gather(1, others), -1)


@reference_strategy("nearest")
def nearest_references(logits: Tensor, targets: Tensor, count: int, _weights: Tensor | None = None) -> Tensor:
    """Classes whose logit is closest to the target's: ``|y_j - y_c|`` ascending (official code)."""
    distance = (logits.detach() - logits.detach().gather(1, targets[:, None])).abs()
    return _ranked_excluding_target(distance, targets, count, logits, descending=False)


@reference_strategy("top")
def top_references(logits: Tensor, targets: Tensor, count: int, _weights: Tensor | None = None) -> Tensor:
    """The highest-scoring classes other than the target (paper Table 2: 2nd, 3rd, 4th prediction)."""
    return _ranked_excluding_target(logits, targets, count, logits, descending=True)


@reference_strategy("weights")
def weight_references(logits: Tensor, targets: Tensor, count: int, weights: Tensor | None = None) -> Tensor:
    """Classes whose classifier rows ``W_j`` have the highest cosine similarity to the target's row ``W_c``."""
    if weights is None:
        raise InvalidArgumentError(
            "references='weights' needs the classifier: pass classifier_weights=<the (C, D) weight matrix or the "
            "linear head module, e.g. model.fc>"
        )
    matrix = weights.detach().to(logits.device, torch.float32)
    usable = matrix.isfinite().all(dim=1) & (matrix.abs().amax(dim=1) > 0)
    bad = targets[~usable[targets]]
    if bad.numel():
        what = "all zero" if bool(matrix[bad[0]].isfinite().all()) else "not finite"
        raise InvalidArgumentError(
            f"references='weights': the classifier row of target class {int(bad[0])} is {what} (a head still at its "
            "zero initialisation?), so its cosine similarity ranks no class; use references='nearest' or 'top'"
        )
    rows = torch.nn.functional.normalize(matrix.nan_to_num(0.0, 0.0, 0.0), dim=1)
    similarity = (rows[targets] @ rows.T).masked_fill(~usable[None], float("nan"))  # unusable rows rank last
    return _ranked_excluding_target(similarity, targets, count, logits, descending=True)


def classifier_matrix(classifier: ClassifierWeights | None, num_classes: int) -> Tensor | None:
    """The ``(C, D)`` weight matrix of a linear head given as a tensor or a module with a 2-D ``.weight``."""
    if classifier is None:
        return None
    weight = getattr(classifier, "weight", None) if isinstance(classifier, nn.Module) else classifier
    if isinstance(classifier, nn.Module) and not isinstance(weight, Tensor):
        linears = [name for name, module in classifier.named_modules() if isinstance(module, nn.Linear)]
        hint = "; pass the model's final nn.Linear (e.g. model.fc, model.classifier[-1], model.heads.head)"
        if linears:
            access = "".join(f"[{part}]" if part.isdigit() else f".{part}" for part in linears[-1].split("."))
            hint = f"; pass its linear layer, e.g. classifier_weights=<this module>{access}"
        raise InvalidTypeError(f"classifier_weights is a {type(classifier).__name__}, which has no .weight{hint}")
    if not isinstance(weight, Tensor) or weight.ndim != 2:
        raise InvalidTypeError(
            "classifier_weights must be a (C, D) tensor or a linear module with a 2-D .weight; got "
            f"{type(classifier).__name__}"
            + (f" with weight shape {tuple(weight.shape)}" if isinstance(weight, Tensor) else "")
        )
    if weight.shape[0] != num_classes:
        raise InvalidArgumentError(
            f"classifier_weights has {weight.shape[0]} rows but the model has {num_classes} classes"
        )
    return weight


@dataclass(frozen=True)
class References:
    """Reference classes ``d_t`` per image.

    Attributes:
        indices: ``(B, T)`` long; ``-1`` pads rows that have fewer references than the longest row.
        strategy: the strategy's name, or ``"explicit"``.
    """

    indices: Tensor
    strategy: str

    @property
    def mask(self) -> Tensor:
        """``(B, T)`` bool: which entries of :attr:`indices` are real references."""
        return self.indices >= 0


def _as_reference_rows(references: object, batch: int) -> Tensor | list[list[int]]:
    """Explicit references as a ``(B, T)`` tensor or a list of ``B`` integer lists (NumPy arrays and rows given as
    tensors or arrays included); anything else is a :class:`~finercam.errors.InvalidTypeError` naming what is
    accepted."""
    accepted = (
        f"a strategy name {sorted(REFERENCE_STRATEGIES)}, a (B, T) integer tensor or array, or a list of {batch} "
        "lists of classes (one per image)"
    )
    if isinstance(references, Tensor):
        return references
    if hasattr(references, "__array__") and not isinstance(references, Sequence):
        return torch.as_tensor(references)  # type: ignore[arg-type]
    if not isinstance(references, Sequence) or isinstance(references, str | bytes):
        raise InvalidTypeError(
            f"references must be {accepted}; got {type(references).__name__} {references!r} (how many references a "
            "strategy picks is num_references=)"
        )
    rows: list[list[int]] = []
    for image, row in enumerate(references):
        if isinstance(row, Tensor) or (hasattr(row, "__array__") and not isinstance(row, Sequence)):
            array = torch.as_tensor(row)
            row = array.tolist() if array.ndim == 1 else row
        if not isinstance(row, Sequence) or isinstance(row, str | bytes):
            raise InvalidTypeError(
                f"references[{image}] is {type(row).__name__} {row!r}; expected a list of classes for that image. "
                f"references must be {accepted}"
            )
        if not all(_is_integer(d) for d in row):
            raise InvalidTypeError(f"references for image {image} must be integer classes; got {list(row)!r}")
        rows.append([int(d) for d in row])
    return rows


def _explicit_references(references: object, targets: Tensor, num_classes: int) -> Tensor:
    batch = targets.shape[0]
    given = _as_reference_rows(references, batch)
    if isinstance(given, Tensor):
        if given.is_floating_point() or given.is_complex() or given.dtype == torch.bool:
            raise InvalidTypeError(f"references must hold integer class indices; got dtype {given.dtype}")
        if given.ndim != 2 or given.shape[0] != batch or given.shape[1] < 1:
            raise InvalidArgumentError(
                f"references has shape {tuple(given.shape)}; expected (B, T) = ({batch}, T) with T >= 1, "
                f"a list of {batch} lists, or a strategy name {sorted(REFERENCE_STRATEGIES)}"
            )
        indices = _as_index(given, targets.device)
        _check_classes(indices, num_classes, "reference class")
    else:
        if len(given) != batch:
            raise InvalidArgumentError(
                f"references is a list of {len(given)} lists; expected a list of {batch} lists (one per image), a "
                f"(B, T) tensor, or a strategy name {sorted(REFERENCE_STRATEGIES)}"
            )
        for image, row in enumerate(given):
            if len(row) == 0:
                raise InvalidArgumentError(f"references for image {image} is empty; give at least one class")
        width = max(len(row) for row in given)
        # Checked before padding (padded with class 0 here), so that a given -1 is refused like any other non-class.
        _check_classes(torch.tensor([row + [0] * (width - len(row)) for row in given]), num_classes, "reference class")
        padded = [row + [-1] * (width - len(row)) for row in given]
        indices = torch.tensor(padded, dtype=torch.long, device=targets.device)
    for image in range(batch):
        row = indices[image][indices[image] >= 0].tolist()
        if len(set(row)) != len(row):
            raise InvalidArgumentError(f"references for image {image} repeat a class: {row}")
        if int(targets[image]) in row:
            raise InvalidArgumentError(
                f"references for image {image} contain its target class {int(targets[image])}; "
                "a class cannot be its own reference"
            )
    return indices


def select_references(
    references: str | Tensor | Sequence[Sequence[int]] | object,
    logits: Tensor,
    targets: Tensor,
    num_references: int,
    classifier_weights: Tensor | None = None,
) -> References:
    """Choose the reference classes ``d_1..d_T`` of every image.

    Args:
        references: a strategy name from :data:`REFERENCE_STRATEGIES`, a ``(B, T)`` tensor, or a list of ``B``
            lists (rows may differ in length).
        logits: ``(B, C)`` class scores.
        targets: ``(B,)`` target classes.
        num_references: ``T`` for strategies; capped at ``C - 1`` (``C == 1`` gives no reference).
        classifier_weights: the ``(C, D)`` classifier rows, for the ``weights`` strategy.
    """
    num_classes = logits.shape[1]
    nan_rows = logits.detach().isnan().any(dim=1)
    if bool(nan_rows.any()):
        raise InvalidArgumentError(
            f"the model's logits contain NaN for image(s) {nan_rows.nonzero().flatten().tolist()}: nothing can be "
            "explained for them (check the input for NaN, and the model's dtype for overflow)"
        )
    if isinstance(references, str):
        strategy = REFERENCE_STRATEGIES.get(references)
        if strategy is None:
            raise InvalidArgumentError(
                f"unknown reference strategy {references!r}; use one of {sorted(REFERENCE_STRATEGIES)}, a (B, T) "
                "tensor or a list of lists of classes"
            )
        _check_finite(logits, targets[:, None], "target class")
        count = min(num_references, num_classes - 1)
        indices = strategy(logits, targets, count, classifier_weights)
        return References(indices=indices, strategy=references)
    _check_finite(logits, targets[:, None], "target class")
    indices = _explicit_references(references, targets, num_classes)
    _check_finite(logits, indices, "reference class")
    return References(indices=indices, strategy="explicit")


def _check_finite(logits: Tensor, classes: Tensor, what: str) -> None:
    """Refuse explaining or contrasting a class whose logit is infinite (a class the model masks): its score has no
    gradient and makes Score-CAM's weights undefined. ``-1`` entries (padding) are skipped."""
    values = logits.detach().gather(1, classes.clamp(min=0))
    bad = ~values.isfinite() & (classes >= 0)
    if bool(bad.any()):
        image, slot = (int(i) for i in bad.nonzero()[0])
        raise InvalidArgumentError(
            f"{what} {int(classes[image, slot])} of image {image} has logit {float(values[image, slot])} (the model "
            "masks it): it cannot be explained or contrasted; choose a class with a finite score"
        )


def contrast_terms(logits: Tensor, targets: Tensor, references: References, aggregation: str) -> tuple[Tensor, Tensor]:
    r"""The two terms of the contrastive score ``s(\gamma) = u - \gamma v`` for every image.

    Images without references (``C == 1``) get ``u = y_c`` and ``v = 0``: the base CAM.

    Args:
        logits: ``(B, C)`` class scores ``y`` (gradients flow through them).
        targets: ``(B,)`` target classes ``c``.
        references: the reference classes ``d_t``.
        aggregation: ``"mean"`` or ``"softmax"``.

    Returns:
        ``u`` and ``v``, each of shape ``(B,)``.
    """
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # SOFTMAX_EPS and the probabilities of unlikely references vanish in half precision
    target_logit = logits.gather(1, targets[:, None]).squeeze(1)
    mask = references.mask
    zero = logits.new_zeros(())
    # Padding slots (-1) are zeroed with `where`, never multiplied by 0: another class's logit may be infinite.
    reference_logits = torch.where(mask, logits.gather(1, references.indices.clamp(min=0)), zero)
    count = mask.sum(dim=1)
    has_reference = count > 0
    if aggregation == "mean":
        v = reference_logits.sum(dim=1) / count.clamp(min=1)
        return target_logit, v
    if aggregation == "softmax":
        probabilities = torch.where(mask, torch.softmax(logits, dim=1).gather(1, references.indices.clamp(min=0)), zero)
        total = probabilities.sum(dim=1) + SOFTMAX_EPS
        u = torch.where(has_reference, probabilities.sum(dim=1) * target_logit / total, target_logit)
        v = (probabilities * reference_logits).sum(dim=1) / total
        return u, v
    raise InvalidArgumentError(f"unknown aggregation {aggregation!r}; use one of {list(AGGREGATIONS)}")


def finer_score(
    logits: Tensor, targets: Tensor, references: References, gamma: float, aggregation: str = "mean"
) -> Tensor:
    r"""The contrastive score ``s = y_c - \gamma\,\mathrm{agg}_t\, y_{d_t}`` of every image, shape ``(B,)``."""
    u, v = contrast_terms(logits, targets, references, aggregation)
    return u - gamma * v
