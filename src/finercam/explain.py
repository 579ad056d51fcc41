r"""The public :class:`FinerCAM`: Finer-CAM over any base CAM method, for a batch of images, in one forward pass.

Finer-CAM explains ``s = y_c - \gamma\,\mathrm{agg}_t\, y_{d_t}`` rather than ``y_c`` (Zhang et al., CVPR 2025).
With gradients ``g_u`` and ``g_v`` of the two terms of ``s(\gamma) = u - \gamma v``, the gradient of every
``\gamma`` is ``g_u - \gamma g_v``: one forward pass and two vector-Jacobian products over the layers above the
target layer yield the baseline, the Finer-CAM and any ``\gamma`` sweep.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from finercam.autolayer import auto_layer
from finercam.capture import (
    batch_coupling,
    check_batch_independent,
    checked_forward,
    extract_logits,
    forward_with_capture,
    preserved_model,
    vector_jacobian_products,
)
from finercam.errors import InvalidArgumentError, InvalidTypeError, ModelOutputError, ModelShapeError
from finercam.grids import grid_reshape
from finercam.layers import (
    LayerSpec,
    Reshape,
    TargetLayer,
    check_model,
    infer_device_dtype,
    resolve_layers,
    to_maps,
)
from finercam.methods import get_method
from finercam.objectives import (
    AGGREGATIONS,
    ClassifierWeights,
    ClassSets,
    References,
    Targets,
    classifier_matrix,
    contrast_terms,
    resolve_class_sets,
    resolve_targets,
    select_references,
)
from finercam.postprocess import fuse_layers
from finercam.result import CAMResult, SweepResult
from finercam.scorecam import channel_scores, score_cam_maps

ReferenceSpec = str | Tensor | Sequence[Sequence[int]]
AUTO = "auto"
DEFAULT_GAMMA = 0.6
DEFAULT_NUM_REFERENCES = 3
DEFAULT_SWEEP = (0.0, 0.3, 0.6, 1.0, 2.0)
SCORE_PIXELS_PER_PASS = 64 * 512 * 512
"""The most input pixels one Score-CAM forward pass holds (``score_batch_size`` masked inputs, fewer when large)."""


def _check_gamma(gamma: object) -> float:
    if isinstance(gamma, Tensor) and gamma.numel() == 1 and not gamma.is_complex() and gamma.dtype != torch.bool:
        gamma = float(gamma)  # a 0-d (or one-element) tensor, e.g. torch.tensor(0.6)
    if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real):
        raise InvalidTypeError(f"gamma must be a real number >= 0; got {gamma!r} ({type(gamma).__name__})")
    value = float(gamma)
    if not math.isfinite(value) or value < 0:
        raise InvalidArgumentError(
            f"gamma must be a finite number >= 0 (0 gives the base CAM, the paper uses 0.6, up to ~2 for fine "
            f"details); got {gamma!r}"
        )
    return value


def _check_images(images: object) -> Tensor:
    if not isinstance(images, Tensor):
        raise InvalidTypeError(f"images must be a torch.Tensor of shape (B, C, H, W); got {type(images).__name__}")
    if images.ndim != 4:
        hint = " (a single image? use images.unsqueeze(0))" if images.ndim == 3 else ""
        raise InvalidArgumentError(
            f"images must be a 4-D batch (B, C, H, W); got shape {tuple(images.shape)}{hint}"
        )
    if not images.is_floating_point():
        raise InvalidTypeError(
            f"images must be a floating-point tensor (normalised pixels); got dtype {images.dtype}"
        )
    if images.shape[0] == 0:
        raise InvalidArgumentError("images is an empty batch (B = 0)")
    return images


@dataclass(frozen=True)
class _Request:
    """What one call asks for: the gammas, the target sets (from the logits: one per class slot), and how
    references are chosen and aggregated."""

    gammas: tuple[float, ...]
    target_sets: Callable[[Tensor], list[Targets]]
    references: ReferenceSpec
    num_references: int
    aggregation: str
    classifier_weights: ClassifierWeights | None


def _is_auto(target_layer: object) -> bool:
    return isinstance(target_layer, str) and target_layer == AUTO


class FinerCAM:
    """Finer-CAM explanations of a classifier.

    Example:
        >>> with FinerCAM(model) as cam:  # doctest: +SKIP  (target layer and token grid found automatically)
        ...     result = cam(images, references="nearest", num_references=3, gamma=0.6)
        >>> result.maps.shape  # doctest: +SKIP
        torch.Size([8, 224, 224])

    Hooks exist only during a call, so the model is never left modified; the context manager is for symmetry with
    other CAM libraries and never swallows exceptions.

    Args:
        model: a classifier returning logits ``(B, C)`` (or a tuple / an output with ``.logits``).
        target_layer: ``"auto"`` (default: the last transformer block's first norm, or a CNN's last spatial stage;
            see :mod:`finercam.autolayer`; resolved at the first call, on its images, and kept), a submodule, its
            dotted name (``"layer4"``, ``"blocks.-1.norm1"``), or a list of those.
        method: a base CAM from :data:`finercam.methods.METHODS` (``gradcam``, ``hirescam``, ``xgradcam``,
            ``gradcam++``, ``layercam``, ``scorecam``).
        reshape: ``"auto"`` (default: inferred per layer and per call from the activation, the image size and the
            model, see :func:`finercam.grids.grid_reshape`), a callable turning a layer's output into maps
            ``(B, K, h, w)`` for every layer (e.g. :class:`finercam.TokenGrid`), or ``None`` for layers that
            already emit channels-first maps.
        classifier_weights: the classifier's ``(C, D)`` rows or the linear head, for ``references="weights"``.
        score_batch_size: at most this many masked inputs per forward pass for Score-CAM; fewer for large inputs, so
            that a pass holds at most :data:`SCORE_PIXELS_PER_PASS` pixels (64 inputs of 512 x 512; one 3000 x 3000
            input per pass).
    """

    def __init__(
        self,
        model: nn.Module,
        target_layer: LayerSpec | Sequence[LayerSpec] = AUTO,
        method: str = "gradcam",
        *,
        reshape: Reshape | str | None = AUTO,
        classifier_weights: ClassifierWeights | None = None,
        score_batch_size: int = 64,
    ) -> None:
        check_model(model)
        if isinstance(reshape, str) and reshape != AUTO:
            raise InvalidArgumentError(f"reshape must be 'auto', None or a callable; got {reshape!r}")
        if reshape is not None and not isinstance(reshape, str) and not callable(reshape):
            raise InvalidTypeError(
                f"reshape must be 'auto', None or a callable (e.g. TokenGrid(14, 14)); got {type(reshape).__name__}"
            )
        if isinstance(score_batch_size, bool) or not isinstance(score_batch_size, int) or score_batch_size < 1:
            raise InvalidArgumentError(f"score_batch_size must be a positive int; got {score_batch_size!r}")
        self.model = model
        self._layers = None if _is_auto(target_layer) else resolve_layers(model, target_layer)
        self.method = get_method(method)
        self.reshape = reshape
        self.classifier_weights = classifier_weights
        self.score_batch_size = score_batch_size

    def __enter__(self) -> FinerCAM:
        return self

    def __exit__(self, *_exc: object) -> None:
        return None

    def __repr__(self) -> str:
        layers = "'auto'" if self._layers is None else [layer.name for layer in self._layers]
        return f"FinerCAM(model={type(self.model).__name__}, target_layer={layers}, method={self.method.name!r})"

    @property
    def layers(self) -> tuple[TargetLayer, ...]:
        """The target layers. With ``target_layer="auto"`` not yet resolved by a call, resolving it here makes a
        dry run at the size the model declares (else 224 x 224)."""
        if self._layers is None:
            self._layers = resolve_layers(self.model, auto_layer(self.model))
        return self._layers

    def _resolve_layers(self, images: Tensor) -> tuple[TargetLayer, ...]:
        """The target layers, ``"auto"`` resolved on the first of ``images`` (model already in eval mode)."""
        if self._layers is None:
            self._layers = resolve_layers(self.model, auto_layer(self.model, example=images[:1]))
        return self._layers

    def __call__(
        self,
        images: Tensor,
        targets: Targets = None,
        references: ReferenceSpec = "nearest",
        num_references: int = DEFAULT_NUM_REFERENCES,
        gamma: float = DEFAULT_GAMMA,
        aggregation: str = "mean",
        classifier_weights: ClassifierWeights | None = None,
    ) -> CAMResult:
        r"""Explain ``s = y_c - \gamma\,\mathrm{agg}_t\, y_{d_t}`` for every image.

        Args:
            images: ``(B, C, H, W)`` preprocessed images; moved to the model's device and dtype.
            targets: the classes ``c`` to explain: ``None`` (top prediction), an int, or one class per image.
            references: a strategy (``"nearest"``, ``"top"``, ``"weights"``), a ``(B, T)`` tensor, or a list of
                ``B`` lists of classes.
            num_references: ``T`` for strategies (capped at ``C - 1``).
            gamma: comparison strength ``\gamma >= 0``; ``0`` gives the base CAM.
            aggregation: ``"mean"`` (paper) or ``"softmax"`` (official library's ``FinerWeightedTarget``).
            classifier_weights: overrides the constructor's, for ``references="weights"``.
        """
        value = _check_gamma(gamma)
        sweep = self.sweep(
            images, [value], targets, references, num_references, aggregation, classifier_weights
        )
        return sweep.at(0)

    def sweep(
        self,
        images: Tensor,
        gammas: Sequence[float] = DEFAULT_SWEEP,
        targets: Targets = None,
        references: ReferenceSpec = "nearest",
        num_references: int = DEFAULT_NUM_REFERENCES,
        aggregation: str = "mean",
        classifier_weights: ClassifierWeights | None = None,
    ) -> SweepResult:
        r"""Explain every image at several comparison strengths ``\gamma`` from a single forward pass.

        Returns:
            A :class:`SweepResult` whose ``maps`` is ``(G, B, H, W)``. Arguments are those of :meth:`__call__`.
        """
        if isinstance(gammas, numbers.Real) or (isinstance(gammas, Tensor) and gammas.ndim == 0):
            raise InvalidTypeError("gammas must be a sequence of numbers, e.g. [0, 0.6, 2]; use cam(...) for one")
        if isinstance(gammas, Tensor) or hasattr(gammas, "__array__"):  # torch.linspace(0, 2, 5), a NumPy array
            gammas = torch.as_tensor(gammas).flatten().tolist()  # type: ignore[arg-type]
        gamma_values = tuple(_check_gamma(g) for g in gammas)
        if not gamma_values:
            raise InvalidArgumentError("gammas is empty; give at least one comparison strength")
        request = _Request(gamma_values, lambda _logits: [targets], references, num_references, aggregation,
                           classifier_weights)
        return self._run(images, request)[0]

    def explain_classes(
        self,
        images: Tensor,
        classes: ClassSets = 3,
        references: str = "nearest",
        num_references: int = DEFAULT_NUM_REFERENCES,
        gamma: float = DEFAULT_GAMMA,
        aggregation: str = "mean",
        classifier_weights: ClassifierWeights | None = None,
    ) -> tuple[CAMResult, ...]:
        r"""Explain several classes of every image from one forward pass.

        ``results[k]`` explains class ``classes[b, k]`` of each image ``b`` against that class's own references,
        exactly as ``cam(images, targets=classes[:, k], ...)`` would, but the forward pass (and, for Score-CAM, the
        masked forwards) is shared by all ``K`` classes: only the vector-Jacobian products grow with ``K``.

        Args:
            images: ``(B, C, H, W)`` preprocessed images.
            classes: an int ``K`` (each image's ``K`` top predictions, best first; the default 3), a list of ``K``
                classes for every image, ``B`` lists of ``K`` classes, or a ``(B, K)`` integer tensor.
            references: a strategy (``"nearest"``, ``"top"``, ``"weights"``), chosen for each class separately.
            num_references, gamma, aggregation, classifier_weights: as for :meth:`__call__`.

        Returns:
            ``K`` :class:`CAMResult`, one per class slot.
        """
        if not isinstance(references, str):
            raise InvalidArgumentError(
                "explain_classes chooses the references of each class with a strategy (references='nearest', 'top' "
                f"or 'weights'); got {type(references).__name__}. For references of your own, call cam(images, "
                "targets=..., references=...) once per class"
            )
        value = _check_gamma(gamma)
        request = _Request((value,), lambda logits: list(resolve_class_sets(classes, logits).unbind(1)), references,
                           num_references, aggregation, classifier_weights)
        return tuple(sweep.at(0) for sweep in self._run(images, request))

    def _run(self, images: Tensor, request: _Request) -> list[SweepResult]:
        """Check the shared arguments, then explain each target set of the request in one pass."""
        images = _check_images(images)
        if request.aggregation not in AGGREGATIONS:
            raise InvalidArgumentError(
                f"unknown aggregation {request.aggregation!r}; use one of {list(AGGREGATIONS)}"
            )
        try:
            count = 0 if isinstance(request.num_references, bool) else operator.index(request.num_references)
        except TypeError:
            count = 0
        if count < 1:
            raise InvalidArgumentError(f"num_references must be an int >= 1; got {request.num_references!r}")
        check_batch_independent(self.model, images.shape[0])
        device, dtype = infer_device_dtype(self.model)
        images = images.to(device=device, dtype=dtype or images.dtype)
        weights = request.classifier_weights if request.classifier_weights is not None else self.classifier_weights
        with torch.inference_mode(False), preserved_model(self.model):
            self._resolve_layers(images)
            return self._explain(images, replace(request, num_references=count, classifier_weights=weights))

    def _explain(self, images: Tensor, request: _Request) -> list[SweepResult]:
        method, gammas, aggregation = self.method, request.gammas, request.aggregation
        capture = forward_with_capture(self.model, images, self.layers, record_graph=method.uses_gradients)
        logits = capture.logits
        weights = classifier_matrix(request.classifier_weights, logits.shape[1])
        objectives = []
        for targets in request.target_sets(logits):
            target_classes = resolve_targets(targets, logits)
            objectives.append((target_classes, select_references(request.references, logits, target_classes,
                                                                 request.num_references, weights)))
        gamma = torch.tensor(gammas, dtype=logits.dtype, device=logits.device)
        if not bool(gamma.isfinite().all()):
            too_large = [g for g, value in zip(gammas, gamma.tolist(), strict=True) if not math.isfinite(value)]
            raise InvalidArgumentError(
                f"gamma {too_large[0]!r} does not fit the model's dtype {logits.dtype} (largest "
                f"{torch.finfo(logits.dtype).max:.4g}); comparison strengths are usually 0 to about 2"
            )

        reshapes = self._reshapes(capture.activations, images)
        if method.uses_gradients:
            per_objective = self._gradient_maps(capture.activations, reshapes, logits, objectives, aggregation, gamma)
        else:
            per_objective = self._score_maps(capture.activations, reshapes, images, objectives, aggregation, gamma)
        self._check_finite(per_objective, capture.activations, images.shape[0])

        size = (images.shape[-2], images.shape[-1])
        return [
            SweepResult(
                maps=fuse_layers(raw, size),
                baseline_maps=fuse_layers(baseline, size),
                logits=logits.detach(),
                targets=target_classes,
                references=chosen.indices,
                method=method.name,
                aggregation=aggregation,
                reference_strategy=chosen.strategy,
                layers=tuple(layer.name for layer in self.layers),
                layer_raw_maps=tuple(raw),
                layer_baseline_raw_maps=tuple(baseline),
                gammas=gammas,
            )
            for (target_classes, chosen), (raw, baseline) in zip(objectives, per_objective, strict=True)
        ]

    def _check_finite(
        self, per_objective: list[tuple[list[Tensor], list[Tensor]]], activations: tuple[Tensor, ...], batch: int
    ) -> None:
        """Refuse NaN or infinite raw maps (one check per layer), naming the layer, the images and the cause.

        The logits are finite (checked with the references), so the cause is inside: an activation that overflowed
        (float16's largest value is 65504) or a gradient that did.
        """
        for layer, activation in enumerate(activations):
            finite = torch.ones(batch, dtype=torch.bool, device=activation.device)
            for raw, baseline in per_objective:
                for maps in (raw[layer], baseline[layer]):  # (..., B, h, w)
                    finite &= maps.isfinite().flatten(-2).all(-1).reshape(-1, batch).all(0)
            bad = ~finite
            if bool(bad.any()):
                images = bad.nonzero().flatten().tolist()
                source = "activations" if not bool(activation.detach().isfinite().all()) else "gradients or scores"
                low_precision = activation.is_floating_point() and torch.finfo(activation.dtype).bits < 32
                advice = (
                    f"with a {activation.dtype} model this is usually an overflow: explain it in float32 "
                    "(model.float(); finercam run: without --amp)" if low_precision else
                    "check the model's weights for NaN or infinite values, and the layer's computation for an overflow"
                )
                raise ModelOutputError(
                    f"the maps of target layer {self.layers[layer].name!r} are not finite (NaN or infinite) for "
                    f"image(s) {images[:8]}{' ...' if len(images) > 8 else ''}: the layer's {source} are; {advice}"
                )

    def _layer_maps(self, index: int, activation: Tensor, reshape: Reshape | None, batch: int) -> Tensor:
        """Layer ``index``'s activation as maps ``(B, K, h, w)``, refused when they are not one per image (a model
        that folds patches or windows into the batch, as MobileViT and TNT do inside their blocks) or 1 x 1."""
        maps = to_maps(activation, reshape)
        name = self.layers[index].name
        if maps.shape[0] != batch:
            raise ModelShapeError(
                f"target layer {name!r} emits {tuple(activation.shape)} for {batch} image(s), {maps.shape[0]} maps: "
                "its batch dimension is not the images' (the model folds patches or windows into it there), so its "
                "maps cannot be told apart per image. Pick a layer whose output is (B, ...), e.g. the output of the "
                "stage or block around it (finercam.candidate_layers(model) lists the choices)"
            )
        if maps.shape[-2:] == (1, 1):
            raise ModelShapeError(
                f"target layer {name!r} emits 1 x 1 maps ({tuple(activation.shape)}): a CAM there has no spatial "
                "extent, so every map would be flat. Pick a layer before the global pooling "
                "(finercam.candidate_layers(model) lists the choices)"
            )
        return maps

    def _reshapes(self, activations: tuple[Tensor, ...], images: Tensor) -> list[Reshape | None]:
        """The reshape of each layer: the user's, or inferred from its activation and the image size."""
        if not isinstance(self.reshape, str):
            return [self.reshape] * len(activations)
        size = (int(images.shape[-2]), int(images.shape[-1]))
        return [
            grid_reshape(self.model, layer.module, tuple(activation.shape), size, batch_size=images.shape[0])
            for layer, activation in zip(self.layers, activations, strict=True)
        ]

    @staticmethod
    def _stacked_maps(stacked: Tensor, reshape: Reshape | None) -> Tensor:
        """Reshape a stack ``(S, ...)`` of layer-shaped tensors (one per score) into ``(S, B, K, h, w)``."""
        return torch.stack([to_maps(tensor, reshape) for tensor in stacked])

    def _gradient_maps(
        self,
        activations: tuple[Tensor, ...],
        reshapes: list[Reshape | None],
        logits: Tensor,
        objectives: list[tuple[Tensor, References]],
        aggregation: str,
        gamma: Tensor,
    ) -> list[tuple[list[Tensor], list[Tensor]]]:
        """For each (targets, references) objective: raw maps ``(G, B, h, w)`` and baseline raw maps ``(B, h, w)``
        per layer, from two or three VJPs per objective over the one recorded graph."""
        rows = []
        for targets, references in objectives:
            u, v = contrast_terms(logits, targets, references, aggregation)
            rows += [u, v]
            if aggregation != "mean":  # with "mean", u is y_c itself
                rows.append(logits.gather(1, targets[:, None]).squeeze(1).to(u.dtype))
        gradients = vector_jacobian_products(torch.stack(rows), activations, [layer.name for layer in self.layers])
        compute = self.method.compute
        assert compute is not None
        width = len(rows) // len(objectives)
        results: list[tuple[list[Tensor], list[Tensor]]] = [([], []) for _ in objectives]
        for layer, (activation, gradient, reshape) in enumerate(zip(activations, gradients, reshapes, strict=True)):
            maps = self._layer_maps(layer, activation.detach(), reshape, logits.shape[0])
            stacked = self._stacked_maps(gradient, reshape)
            for slot, (raw_per_layer, baseline_per_layer) in enumerate(results):
                grads = stacked[slot * width:(slot + 1) * width]
                if self.method.linear_in_gradient:
                    terms = compute(maps, grads)
                    raw = terms[0] - gamma[:, None, None, None] * terms[1]
                    baseline = terms[0] if aggregation == "mean" else terms[2]
                else:
                    raw = compute(maps, grads[0] - gamma[:, None, None, None, None] * grads[1])
                    baseline = compute(maps, grads[0] if aggregation == "mean" else grads[2])
                raw_per_layer.append(raw)
                baseline_per_layer.append(baseline)
        return results

    def _score_maps(
        self,
        activations: tuple[Tensor, ...],
        reshapes: list[Reshape | None],
        images: Tensor,
        objectives: list[tuple[Tensor, References]],
        aggregation: str,
        gamma: Tensor,
    ) -> list[tuple[list[Tensor], list[Tensor]]]:
        """Score-CAM raw maps per layer and objective: one set of masked forwards serves every objective, every
        gamma and the baseline."""
        forward: Callable[[Tensor], Tensor] = lambda batch: extract_logits(checked_forward(self.model, batch))  # noqa: E731
        # a model that normalises with the batch's statistics would mix the masked inputs: one at a time
        pixels = int(images.shape[-2]) * int(images.shape[-1])
        pass_size = 1 if batch_coupling(self.model) else min(self.score_batch_size,
                                                             max(1, SCORE_PIXELS_PER_PASS // pixels))
        results: list[tuple[list[Tensor], list[Tensor]]] = [([], []) for _ in objectives]
        for layer, (activation, reshape) in enumerate(zip(activations, reshapes, strict=True)):
            maps = self._layer_maps(layer, activation, reshape, images.shape[0])
            scores = channel_scores(forward, images, maps, objectives, aggregation, pass_size)
            for (raw_per_layer, baseline_per_layer), (u, v, target_logit) in zip(results, scores, strict=True):
                raw_per_layer.append(score_cam_maps(maps, u - gamma[:, None, None] * v))
                baseline_per_layer.append(score_cam_maps(maps, target_logit))
        return results
