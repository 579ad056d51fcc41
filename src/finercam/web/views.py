r"""What the web demo shows, computed without gradio: an uploaded image explained as display-ready panels.

:func:`explain_view` runs :func:`finercam.explain_image.explain_image` (the ``finercam explain`` command's code) and
draws the base CAM of ``y_c`` and the Finer-CAM of ``y_c - \gamma\,\mathrm{agg}_t\, y_{d_t}`` over the image, plus the
Finer-CAM at every strength of :data:`GAMMA_STRIP` (the same forward pass). :func:`concept_view` does the same for a
text concept with a CLIP model (:func:`finercam.concepts.explain_concepts`). Panels are ``(H, W, 3)`` ``uint8``
arrays, the form image widgets take.

:class:`ModelShelf` holds the models the demo offers, loaded once each, and serialises their use: a model explained
by two requests at once would have two sets of hooks on it.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

import numpy as np
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from finercam.errors import FinerCAMError, InvalidArgumentError, InvalidTypeError
from finercam.explain_image import ImageExplanation, class_name, display_image, explain_image, parse_target
from finercam.hints import page_hints
from finercam.images import ImageReadError, load_image, to_rgb
from finercam.layers import infer_device_dtype
from finercam.methods import get_method

GAMMA_STRIP: tuple[float, ...] = (0.0, 0.3, 0.6, 1.0, 1.5, 2.0)
"""The comparison strengths of the strip under the main panels (``0`` is the base CAM)."""
TOP_CLASSES = 5
"""How many class probabilities :attr:`ExplainView.probabilities` holds."""
PREDICTED = "top prediction"
"""The target choice that explains the predicted class."""
MIN_PANEL_SIDE = 256
"""Smaller panels are enlarged (nearest neighbour, a whole factor) to at least this side, for the screen only."""
_SEPARATORS = re.compile(r"[,;\n]")
_MARKDOWN = re.compile(r"[\\`*\[\]<>|~$]|_(?![^\W_])|(?<![^\W_])_")
"""What makes Markdown of inline text (after ``**Predicted** ``): emphasis, code, links, tags, tables, strike-through,
LaTeX. An underscore inside a word (``white_wingbar``) cannot emphasise and is left as it is; the characters that
only count at the start of a line (``#``, ``-``, ``1.``) need no escape there."""

Model = TypeVar("Model")


@dataclass(frozen=True)
class Panel:
    """One picture of the demo and its caption."""

    image: np.ndarray
    caption: str


@dataclass(frozen=True)
class ExplainView:
    """The classifier tab's output.

    Attributes:
        panels: the image, the base CAM and the Finer-CAM at the chosen gamma.
        strip: the Finer-CAM at each strength of :data:`GAMMA_STRIP`.
        probabilities: the top :data:`TOP_CLASSES` class names with their probabilities.
        summary: what was predicted, explained and contrasted (Markdown).
        explanation: the explanation itself (maps, classes, layer).
    """

    panels: tuple[Panel, Panel, Panel]
    strip: tuple[Panel, ...]
    probabilities: dict[str, float]
    summary: str
    explanation: ImageExplanation


@dataclass(frozen=True)
class ConceptView:
    """The concepts tab's output: the image, the plain concept map and the contrast, and a summary (Markdown)."""

    panels: tuple[Panel, Panel, Panel]
    summary: str


class ModelShelf(Generic[Model]):
    """Models by label, each loaded on first use by its loader and then kept; :meth:`use` lends one at a time.

    Args:
        loaders: ``{label: () -> model}``, in the order the demo lists them.
    """

    def __init__(self, loaders: dict[str, Callable[[], Model]]) -> None:
        if not loaders:
            raise InvalidArgumentError("the demo needs at least one model")
        self._loaders = dict(loaders)
        self._models: dict[str, Model] = {}
        self._locks = {label: threading.Lock() for label in self._loaders}

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(self._loaders)

    def _check(self, label: str) -> None:
        if label not in self._loaders:
            raise InvalidArgumentError(f"unknown model {label!r}; this demo offers {list(self._loaders)}")

    def get(self, label: str) -> Model:
        """The model (loaded now if it was not yet)."""
        self._check(label)
        with self._locks[label]:
            return self._load(label)

    def _load(self, label: str) -> Model:
        if label not in self._models:
            self._models[label] = self._loaders[label]()
        return self._models[label]

    @contextmanager
    def use(self, label: str) -> Iterator[Model]:
        """The model, for this caller alone until the block ends."""
        self._check(label)
        with self._locks[label]:
            yield self._load(label)


def _bytes(pixels: np.ndarray | Tensor) -> np.ndarray:
    """``(H, W, 3)`` in ``[0, 1]`` (or a ``(3, H, W)`` tensor) as ``uint8``, at its own size."""
    if isinstance(pixels, Tensor):
        pixels = pixels.detach().float().cpu().permute(1, 2, 0).numpy()
    return np.round(np.clip(pixels, 0.0, 1.0) * 255).astype(np.uint8)


def to_uint8(pixels: np.ndarray | Tensor) -> np.ndarray:
    """``(H, W, 3)`` in ``[0, 1]`` (or ``(3, H, W)`` tensor) -> ``(H, W, 3)`` ``uint8``, enlarged by a whole factor
    (nearest neighbour) when its longer side is under :data:`MIN_PANEL_SIDE`."""
    array = _bytes(pixels)
    factor = -(-MIN_PANEL_SIDE // max(array.shape[:2]))
    return array.repeat(factor, axis=0).repeat(factor, axis=1) if factor > 1 else array


def over(display: Tensor, cam: Tensor) -> np.ndarray:
    """The map (any size) resized to the displayed image ``(3, H, W)`` and overlaid on it, as ``uint8``."""
    from finercam import viz

    resized = F.interpolate(cam[None, None].float(), size=display.shape[-2:], mode="bilinear", align_corners=False)
    return to_uint8(viz.overlay(display.cpu(), resized[0, 0].clamp(0, 1).cpu()))


_CHANNELS = (3, 4)  # of an (H, W, K) uint8 array: RGB or RGBA


def _array_image(array: np.ndarray) -> Image.Image:
    """A PIL image of an ``(H, W)`` or ``(H, W, 1 | 3 | 4)`` ``uint8`` array."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in _CHANNELS)) or array.dtype != np.uint8:
        raise InvalidArgumentError(
            "expected an (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) uint8 image array; got shape "
            f"{array.shape}, dtype {array.dtype}"
        )
    if min(array.shape[:2]) < 1:
        raise InvalidArgumentError(f"the image is empty ({array.shape[1]} x {array.shape[0]} pixels)")
    return Image.fromarray(np.ascontiguousarray(array))


def _rgb(image: object) -> Image.Image:
    """The RGB image to explain, read as ``finercam explain`` reads a file (:func:`finercam.images.to_rgb`: EXIF
    orientation applied, 16-bit, 32-bit and float images scaled, not clipped)."""
    if image is None:
        raise InvalidArgumentError("no image: upload one, or pick an example")
    if isinstance(image, (str, Path)):
        return load_image(image)
    if isinstance(image, np.ndarray):
        image = _array_image(image)
    if not isinstance(image, Image.Image):
        raise InvalidTypeError(
            f"expected a PIL image, a numpy array or an image file's path; got {type(image).__name__}"
        )
    if min(image.size) < 1:
        raise InvalidArgumentError(f"the image is empty ({image.size[0]} x {image.size[1]} pixels)")
    try:
        return to_rgb(image)
    except OSError as error:  # a truncated or damaged upload, as load_image says it for a file
        raise ImageReadError(f"the image cannot be read: {error}") from None


def markdown_text(text: str) -> str:
    """``text`` shown as written in Markdown (a class named ``__init__`` is not bold, ``<b>`` is no tag)."""
    return _MARKDOWN.sub(lambda found: "\\" + found.group(0), text)


def target_choices(class_names: Sequence[str] | None, num_classes: int | None = None) -> list[str]:
    """The classifier tab's target menu: :data:`PREDICTED`, then every class by name (or index)."""
    if class_names:
        return [PREDICTED, *class_names]
    return [PREDICTED, *(str(index) for index in range(num_classes or 0))]


def _percent(probability: float) -> str:
    return f"{probability:.1%}"


def explain_view(
    loaded: object,
    image: object,
    *,
    method: str = "gradcam",
    gamma: float = 0.6,
    num_references: int = 3,
    references: str = "nearest",
    aggregation: str = "mean",
    target: str | None = PREDICTED,
    layer: str | None = None,
    versus: str | Sequence[str] | None = None,
) -> ExplainView:
    """Explain ``image`` (PIL or ``uint8`` array) with ``loaded`` (a :class:`~finercam.models.LoadedModel`).

    ``target`` is :data:`PREDICTED` (or ``None``), a class name or a class index as text; ``versus`` the reference
    classes themselves (names or indices, in one box separated by commas, or a list; empty: chosen by
    ``references``); the other arguments are those of ``finercam explain``.
    """
    from finercam.models import LoadedModel

    if not isinstance(loaded, LoadedModel):
        raise InvalidTypeError(f"expected a LoadedModel (finercam.models.load_model); got {type(loaded).__name__}")
    rgb = _rgb(image)
    device, _ = infer_device_dtype(loaded.model)
    pixels = loaded.preprocess(rgb).to(device)
    chosen = None if target in (None, PREDICTED) else parse_target(str(target), loaded.class_names, "the class")
    given = _versus_classes(versus, loaded.class_names)
    others = tuple(g for g in GAMMA_STRIP if g != gamma)
    try:
        explanation = explain_image(
            loaded, pixels, layer=layer, method=method, target=chosen, references=references,
            num_references=int(num_references), gamma=gamma, aggregation=aggregation, other_gammas=others,
            versus=given,
        )
    except FinerCAMError as error:  # phrased for the command line or the Python API: in the page's terms
        raise type(error)(page_hints(str(error), loaded.spec)) from None
    display = display_image(rgb, loaded.preprocess)
    result, sweep = explanation.result, explanation.sweep
    assert sweep is not None  # explain_image always sweeps
    title = get_method(method).title
    versus = ", ".join(r.name for r in explanation.references) or "no reference class"
    predicted = explanation.prediction
    panels = (
        Panel(to_uint8(display), f"predicted: {predicted.name} ({_percent(predicted.probability)})"),
        Panel(over(display, result.baseline_maps[0]), f"{title}: explains {explanation.target.name}"),
        Panel(over(display, result.maps[0]), f"Finer-CAM γ={gamma:g}: {explanation.target.name} vs {versus}"),
    )
    strip = tuple(
        Panel(over(display, sweep.maps[sweep.gammas.index(g), 0]), f"γ={g:g}" + (" (base CAM)" if g == 0 else ""))
        for g in GAMMA_STRIP
    )
    probabilities = result.probabilities[0].float()
    top = probabilities.topk(min(TOP_CLASSES, probabilities.numel()))
    names = loaded.class_names
    shown = {class_name(names, int(i)): float(p) for p, i in zip(top.values, top.indices, strict=True)}
    lines = [
        f"**Predicted** {markdown_text(predicted.name)} ({_percent(predicted.probability)})",
        f"**Explained** {markdown_text(explanation.target.name)} ({_percent(explanation.target.probability)})",
        "**Versus** " + (", ".join(f"{markdown_text(r.name)} ({_percent(r.probability)})"
                                   for r in explanation.references)
                         or "nothing: the model has a single class, so the base CAM is shown"),
        f"**Method** {title} at `{explanation.layer}`, γ = {gamma:g}, {aggregation} of {len(explanation.references)} "
        f"{'given' if given else references} reference(s); input {tuple(pixels.shape[-2:])}",
    ]
    if float(result.raw_maps.max()) <= 0:
        lines.append("The Finer-CAM map is negative everywhere: nothing in the image favours the explained class over "
                     "its references at this γ.")
    return ExplainView(panels, strip, shown, "  \n".join(lines), explanation)


def _versus_classes(versus: object, names: tuple[str, ...] | None) -> list[int] | None:
    """The reference classes typed in the versus box (``None`` when it is empty): names or indices separated by
    semicolons or new lines, or by commas where the pieces are not a class name themselves (ImageNet's
    ``"tench, Tinca tinca"`` stays one class)."""
    if isinstance(versus, int) and not isinstance(versus, bool):
        versus = str(versus)
    if versus is None or (isinstance(versus, str) and not versus.strip()):
        return None
    if isinstance(versus, str):
        typed = []
        for piece in (part.strip() for part in re.split(r"[;\n]", versus)):
            whole = piece in (names or ()) or piece.lstrip("-").isdigit()
            typed += [piece] if whole else piece.split(",")
    elif isinstance(versus, Sequence):
        typed = [str(name) for name in versus]
    else:
        raise InvalidTypeError(f"versus must be text or a list of class names; got {type(versus).__name__}")
    chosen = [parse_target(name.strip(), names, "the versus class") for name in typed if name.strip()]
    return [index for index in chosen if index is not None] or None


def parse_prompts(text: object, what: str = "--versus") -> list[str]:
    """Prompts typed in one box, separated by commas, semicolons or new lines (empty ones dropped)."""
    if not isinstance(text, str):
        raise InvalidTypeError(f"{what} must be text; got {type(text).__name__}")
    prompts = [part.strip() for part in _SEPARATORS.split(text) if part.strip()]
    if not prompts:
        raise InvalidArgumentError(f"{what} is empty: give at least one reference prompt, e.g. 'bird'")
    return prompts


def concept_view(
    loaded: object, image: object, concept: str, versus: str | Sequence[str], *, gamma: float = 0.6,
    method: str = "gradcam",
) -> ConceptView:
    """Localize ``concept`` against the reference prompts ``versus`` (one box of text, or a list) on ``image`` with
    ``loaded`` (a :class:`~finercam.concepts.loading.LoadedCLIP`)."""
    from finercam.concepts.api import explain_concepts
    from finercam.concepts.loading import LoadedCLIP

    if not isinstance(loaded, LoadedCLIP):
        raise InvalidTypeError(f"expected a LoadedCLIP (finercam.concepts.load_clip); got {type(loaded).__name__}")
    if not isinstance(concept, str) or not concept.strip():
        raise InvalidArgumentError("the concept is empty; give a text such as 'red beak'")
    prompts = parse_prompts(versus, "the reference box") if isinstance(versus, str) else list(versus)
    rgb = _rgb(image)
    device, _ = infer_device_dtype(loaded.encoders.image_encoder)
    pixels = loaded.preprocess(rgb).to(device)
    explanation = explain_concepts(loaded.encoders, pixels, concept.strip(), prompts, gamma=gamma, method=method)
    display = loaded.display(rgb)
    similarities = explanation.similarities[0].tolist()
    versus_text = ", ".join(explanation.versus)
    panels = (
        Panel(to_uint8(display), "image"),
        Panel(over(display, explanation.concept_maps[0]), f"plain concept map: {explanation.concept!r}"),
        Panel(over(display, explanation.contrast_maps[0]),
              f"Finer-CAM γ={gamma:g}: {explanation.concept!r} vs {versus_text}"),
    )
    lines = [f"**Concept** {markdown_text(repr(explanation.concept))}: cosine {similarities[0]:.3f}"]
    lines += [f"**Versus** {markdown_text(repr(prompt))}: cosine {value:.3f}"
              for prompt, value in zip(explanation.versus, similarities[1:], strict=True)]
    lines.append(f"**Method** {get_method(method).title} at `{explanation.layer}`, γ = {gamma:g}")
    if float(explanation.contrast_raw_maps.max()) <= 0:
        lines.append("The contrast is negative everywhere: the concept adds nothing its references lack.")
    return ConceptView(panels, "  \n".join(lines))


@dataclass(frozen=True)
class ExampleBird:
    """A synthetic example: its file, its species, and a concept it shows (a coloured species-telling part) with its
    genus as the reference."""

    path: Path
    species: str
    concept: str
    genus: str


def example_birds(folder: str | Path, count: int = 6, seed: int = 2025, size: int = 64) -> list[ExampleBird]:
    """Write ``count`` synthetic birds (:mod:`finercam.synth`, the embedded models' 24 species) as PNGs into
    ``folder``, taking the genera in turn; the default size is the one the embedded models were trained at."""
    from finercam import synth
    from finercam.synth.spec import PLAIN, discriminative_parts, species_of

    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise InvalidArgumentError(f"count must be a whole number >= 0; got {count!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = synth.SynthConfig(image_size=size, species_per_genus=8)
    data = synth.generate(max(8 * count, 8), seed=seed, config=config)
    classes = species_of(config)
    chosen: list[ExampleBird] = []
    seen: set[int] = set()
    while len(chosen) < count:
        genus = len(chosen) % config.num_genera
        index = next((i for i in range(len(data.labels)) if i not in seen
                      and classes[int(data.labels[i])].genus_index == genus), None)
        if index is None:
            break
        seen.add(index)
        species = classes[int(data.labels[index])]
        coloured = [part for part in discriminative_parts(config, genus) if species.values[part] != PLAIN]
        concept = f"{species.values[coloured[0]]} {coloured[0]}" if coloured else f"{species.values['beak']} beak"
        path = folder / f"{len(chosen):02d}-{species.name}.png"
        Image.fromarray(_bytes(data.images[index])).save(path)
        chosen.append(ExampleBird(path, species.name, concept, species.genus))
    return chosen
