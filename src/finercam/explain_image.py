"""``finercam explain IMAGE --model SPEC``: one image in; the prediction, its reference classes with their
probabilities, and a figure with the image, the base CAM and the Finer-CAM side by side."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor, nn

from finercam.capture import extract_logits
from finercam.errors import InvalidArgumentError
from finercam.explain import FinerCAM
from finercam.images import load_image
from finercam.methods import get_method
from finercam.models import LoadedModel, Preprocess
from finercam.result import CAMResult, SweepResult


@dataclass(frozen=True)
class ClassScore:
    """A class with its index, name and probability."""

    index: int
    name: str
    probability: float

    def __str__(self) -> str:
        named = f"{self.name} " if self.name != f"class {self.index}" else ""
        return f"{named}(class {self.index}, p={self.probability:.3f})"


@dataclass(frozen=True)
class ImageExplanation:
    """The explanation of one image: what was predicted, explained and contrasted, and the maps.

    Attributes:
        result: the explanation at the chosen gamma.
        sweep: the same target and references at the chosen gamma and every other one asked for (``sweep.gammas[0]``
            is the chosen one), all from the same forward pass; ``None`` from :func:`explain_top_classes`.
    """

    prediction: ClassScore
    target: ClassScore
    references: tuple[ClassScore, ...]
    result: CAMResult
    layer: str
    sweep: SweepResult | None


def class_name(names: tuple[str, ...] | None, index: int) -> str:
    """The name of a class, or ``class N`` when the model has no names."""
    return names[index] if names is not None and index < len(names) else f"class {index}"


def parse_target(target: str | None, names: tuple[str, ...] | None, what: str = "--target") -> int | None:
    """A target given on the command line (``what`` names the option in errors) as a class index or a class name."""
    if target is None:
        return None
    by_name = names.index(target) if names is not None and target in names else None
    # Only a plain integer ("2", not "002") can be an index; a zero-padded folder name is a name.
    by_index = int(target) if target.lstrip("-").isdigit() and str(int(target)) == target else None
    if by_name is not None and by_index is not None and by_name != by_index:
        raise InvalidArgumentError(
            f"{what} {target!r} is both the name of class {by_name} and the index {by_index}; "
            f"give the other class's name, or the index {by_name} for the class named {target!r}"
        )
    if by_name is not None:
        return by_name
    if by_index is not None:
        return by_index
    containing = [name for name in names if target.lower() in name.lower()] if names else []
    close = difflib.get_close_matches(target, names, 5, 0.4) if names else []
    if containing:
        known = f"; {len(containing)} class names contain it, e.g. {containing[:5]}"
    elif close:
        known = f"; the closest class names: {close}"
    else:
        known = f"; known names include {list(names[:5])}" if names else " (this model has no class names)"
    raise InvalidArgumentError(f"{what} {target!r} is neither a class index nor a class name{known}")


def last_linear(model: nn.Module) -> nn.Linear | None:
    """The classifier head: the last ``nn.Linear`` of the model (for ``references="weights"``)."""
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    return linears[-1] if linears else None


def known_num_classes(loaded: LoadedModel) -> int | None:
    """How many classes ``loaded`` has, when known without running it: its class names, else the rows of its last
    linear layer (``None`` for a model with neither, e.g. TorchScript)."""
    if loaded.class_names:
        return len(loaded.class_names)
    head = last_linear(loaded.model)
    return head.out_features if head is not None else None


def explain_image(
    loaded: LoadedModel,
    pixels: Tensor,
    *,
    layer: str | None = None,
    method: str = "gradcam",
    target: int | None = None,
    references: str = "nearest",
    num_references: int = 3,
    gamma: float = 0.6,
    aggregation: str = "mean",
    other_gammas: Sequence[float] = (),
    versus: Sequence[int] | None = None,
) -> ImageExplanation:
    """Explain one preprocessed image ``(3, H, W)`` with Finer-CAM, at ``gamma`` and at ``other_gammas`` too.

    ``versus`` gives the reference classes ``d_t`` themselves (then ``references`` and ``num_references`` are not
    used): "why this class rather than *that* one".

    Raises:
        InvalidArgumentError: ``references="weights"`` for a model without a linear classifier, or a ``versus`` class
            that is the explained one or is repeated (errors are phrased for the command line: ``--references``,
            ``--versus``).
    """
    chosen_layer = layer or loaded.target_layer or "auto"
    given = _check_versus(loaded.class_names, list(versus), target) if versus is not None else None
    weights = _classifier_rows(loaded, references) if given is None else None
    cam = FinerCAM(loaded.model, chosen_layer, method)
    try:
        sweep = cam.sweep(
            pixels[None], gammas=(gamma, *other_gammas), targets=target,
            references=references if given is None else [given], num_references=num_references,
            aggregation=aggregation, classifier_weights=weights,
        )
    except InvalidArgumentError as error:
        if given is not None and target is None and "a class cannot be its own reference" in str(error):
            with torch.no_grad():  # only on this error path: which class the model predicts
                predicted = int(extract_logits(loaded.model(pixels[None])).argmax())
            raise _own_reference(loaded.class_names, predicted, "the top prediction, explained by default") from None
        raise _not_the_classifier(loaded, weights, error) from None
    return _explanation(loaded, cam, sweep.at(0), sweep)


def explain_top_classes(
    loaded: LoadedModel,
    pixels: Tensor,
    count: int,
    *,
    layer: str | None = None,
    method: str = "gradcam",
    references: str = "nearest",
    num_references: int = 3,
    gamma: float = 0.6,
    aggregation: str = "mean",
) -> tuple[ImageExplanation, ...]:
    """Explain each of the ``count`` top predictions of one image ``(3, H, W)`` against its own references, from one
    forward pass (:meth:`FinerCAM.explain_classes`); best first. Their ``sweep`` is ``None``."""
    weights = _classifier_rows(loaded, references)
    cam = FinerCAM(loaded.model, layer or loaded.target_layer or "auto", method)
    try:
        results = cam.explain_classes(pixels[None], classes=count, references=references,
                                      num_references=num_references, gamma=gamma, aggregation=aggregation,
                                      classifier_weights=weights)
    except InvalidArgumentError as error:
        raise _not_the_classifier(loaded, weights, error) from None
    return tuple(_explanation(loaded, cam, result) for result in results)


def _classifier_rows(loaded: LoadedModel, references: str) -> nn.Linear | None:
    """The last linear layer for ``references="weights"`` (else ``None``), or an error when the model has none."""
    if references != "weights":
        return None
    weights = last_linear(loaded.model)
    if weights is None:
        raise InvalidArgumentError(
            "--references weights needs a model whose last layer is a linear classifier (torch.nn.Linear), whose "
            f"weight rows give the class similarities; {loaded.spec} has none (a TorchScript or wrapped model "
            "hides it). Use --references nearest or --references top"
        )
    return weights


def _not_the_classifier(loaded: LoadedModel, weights: nn.Linear | None, error: InvalidArgumentError) -> Exception:
    """``error``, or, when the last linear layer's rows are not one per class, an error that says so."""
    if weights is None or "classifier_weights" not in str(error):
        return error
    return InvalidArgumentError(
        f"--references weights takes the rows of the last linear layer of {loaded.spec} as the classes, but it "
        f"has {weights.out_features} rows, not one per class of the model's output: it is not the classifier. "
        "Use --references nearest or --references top"
    )


def _check_versus(names: tuple[str, ...] | None, versus: list[int], target: int | None) -> list[int]:
    """The ``--versus`` classes, refused when empty, repeated, or the class given with ``--target``."""
    repeated = sorted({index for index in versus if versus.count(index) > 1})
    if not versus or repeated:
        raise InvalidArgumentError(
            "--versus needs one or more different classes" + (
                f"; {class_name(names, repeated[0])!r} (class {repeated[0]}) is given twice" if repeated else "")
        )
    if target is not None and target in versus:
        raise _own_reference(names, target, "the class given with --target")
    return versus


def _own_reference(names: tuple[str, ...] | None, explained: int, how: str) -> InvalidArgumentError:
    return InvalidArgumentError(
        f"--versus {class_name(names, explained)!r} (class {explained}) is {how}: a class cannot be its own "
        "reference. Pick other classes with --versus, or another class to explain with --target"
    )


def _explanation(
    loaded: LoadedModel, cam: FinerCAM, result: CAMResult, sweep: SweepResult | None = None
) -> ImageExplanation:
    """The :class:`ImageExplanation` of one image's result: prediction, target and references with probabilities."""
    probabilities = result.probabilities[0]
    names = loaded.class_names

    def score(index: int) -> ClassScore:
        return ClassScore(index, class_name(names, index), float(probabilities[index]))

    return ImageExplanation(
        prediction=score(int(probabilities.argmax())),
        target=score(int(result.targets[0])),
        references=tuple(score(int(d)) for d in result.references[0] if d >= 0),
        result=result,
        layer=", ".join(cam_layer.name for cam_layer in cam.layers),
        sweep=sweep,
    )


def save_figure(
    path: Path, display: Tensor, explanation: ImageExplanation | Sequence[ImageExplanation], method: str,
    gamma: float,
) -> Path:
    """Image | base CAM | Finer-CAM, titled with the classes and probabilities; one row per explanation (several:
    the classes of :func:`explain_top_classes`)."""
    from finercam import viz

    explanations = [explanation] if isinstance(explanation, ImageExplanation) else list(explanation)
    title = get_method(method).title
    size = tuple(display.shape[-2:])

    def versus(one: ImageExplanation) -> str:
        return ", ".join(f"{r.name} ({r.probability:.2f})" for r in one.references) or "no reference class"

    columns = [
        viz.Column("image", captions=[f"predicted: {one.prediction}" if row == 0 else f"prediction {row + 1}"
                                      for row, one in enumerate(explanations)]),
        viz.Column(f"{title}", torch.cat([_resized(one.result.baseline_maps, size) for one in explanations]).cpu(),
                   captions=[f"explains {one.target}" if len(explanations) > 1 else f"explains {one.target.name}"
                             for one in explanations]),
        viz.Column(f"Finer-CAM γ={gamma:g}", torch.cat([_resized(one.result.maps, size) for one in explanations]).cpu(),
                   captions=[f"vs {versus(one)}" for one in explanations]),
    ]
    pictures = display[None].expand(len(explanations), -1, -1, -1).cpu()
    return viz.save_comparison(path, pictures, columns, panel_inches=3.2)


def _resized(maps: Tensor, size: tuple[int, ...]) -> Tensor:
    """``(B, h, w)`` maps bilinearly resized to ``size``, float32."""
    return torch.nn.functional.interpolate(maps[None].float(), size=size, mode="bilinear", align_corners=False)[0]


def save_maps(
    path: Path, explanations: Sequence[ImageExplanation], display_size: tuple[int, int], metadata: dict[str, str]
) -> Path:
    """The maps of a figure of :func:`save_figure` as safetensors, one row per explanation (``K`` rows):

    * ``base_map``, ``finer_map``: ``(K, H, W)`` in ``[0, 1]`` at ``display_size``, the pictures of the figure;
    * ``base_raw_map``, ``finer_raw_map``: ``(K, h, w)`` signed, before the ReLU, at the layer's resolution;
    * ``logits``: ``(C,)`` the image's class scores ``y``; ``targets``: ``(K,)`` the explained classes ``c``;
      ``references``: ``(K, T)`` the reference classes ``d_t`` (``-1`` pads rows with fewer).

    The metadata holds ``metadata`` (model, image, ...) and, as JSON, the rows' classes with names and probabilities.
    """
    import json

    from safetensors.torch import save_file

    def rows(get: Callable[[ImageExplanation], Tensor]) -> Tensor:
        return torch.cat([get(one).float().cpu() for one in explanations]).contiguous()

    width = max(len(one.references) for one in explanations)
    references = torch.full((len(explanations), width), -1, dtype=torch.long)
    for row, one in enumerate(explanations):
        references[row, : len(one.references)] = torch.tensor([r.index for r in one.references], dtype=torch.long)
    first = explanations[0].result
    save_file({
        "base_map": rows(lambda one: _resized(one.result.baseline_maps, display_size)),
        "finer_map": rows(lambda one: _resized(one.result.maps, display_size)),
        "base_raw_map": rows(lambda one: one.result.baseline_raw_maps),
        "finer_raw_map": rows(lambda one: one.result.raw_maps),
        "logits": first.logits[0].float().cpu().contiguous(),
        "targets": torch.tensor([one.target.index for one in explanations], dtype=torch.long),
        "references": references,
    }, str(path), metadata={
        **metadata, "layer": explanations[0].layer, "method": first.method, "gamma": str(first.gamma),
        "aggregation": first.aggregation, "reference_strategy": first.reference_strategy,
        "prediction": json.dumps(asdict(explanations[0].prediction)),
        "rows": json.dumps([{"target": asdict(one.target), "references": [asdict(r) for r in one.references]}
                            for one in explanations]),
        "maps_size": json.dumps(list(display_size)),
    })
    return path


def display_image(image: str | Path | Image.Image, preprocess: Preprocess) -> Tensor:
    """The image (a file, or an RGB image already open) to draw the maps on, ``(3, H, W)`` in ``[0, 1]``.

    Without a centre crop the whole image reaches the model, so the maps go back onto the original image (as the
    official pipeline does); with a crop, the model's view is shown: the same geometry without normalisation.
    """
    if not isinstance(image, Image.Image):
        image = load_image(image)
    return preprocess.display_geometry()(image)
