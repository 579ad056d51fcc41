r"""Comparison grids from a result store: image | an exemplar of the reference class | base CAM | Finer-CAM.

The exemplar of class ``d_1`` (the first reference of the image) is the dataset image of that class (its label,
or its prediction when the store has no labels) that the model gives the highest probability of ``d_1``: the
clearest example of what the image is being contrasted with, as in the paper's Figure 5. Each panel is labelled with
class names and probabilities; the maps are drawn as in :func:`finercam.viz.overlay`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from finercam.dataset.export import display_image, left_out_reason, save_png
from finercam.dataset.names import inside, safe_component, unique_stem
from finercam.dataset.outputs import claim_folder
from finercam.dataset.render import default_gamma, render_baseline, render_map
from finercam.dataset.store_reader import ImageRecord, ResultStore
from finercam.errors import InvalidArgumentError
from finercam.methods import get_method

TEXT_LINES = 3
LINE_HEIGHT = 14
MARGIN = 6
PANEL_RANGE = (16, 4096)
"""Smallest and largest panel side in pixels (a grid is four panels wide: 4096 makes about 200 MB of pixels)."""


def check_panel(panel: int) -> int:
    """``panel`` when it is a whole number within :data:`PANEL_RANGE`, else an error naming the range."""
    low, high = PANEL_RANGE
    if isinstance(panel, bool) or not isinstance(panel, int) or not low <= panel <= high:
        raise InvalidArgumentError(f"panel must be a whole number of pixels from {low} to {high}; got {panel!r}")
    return panel


def exemplar_rows(store: ResultStore) -> dict[int, list[int]]:
    """For each class, its rows ordered by the probability of that class (best first): the label decides the class
    of a row when every row has one, else the prediction."""
    if len(store) == 0:
        return {}
    key = store.labels if bool((store.labels >= 0).all()) else store.predictions
    probabilities = store.probabilities
    by_class: dict[int, list[int]] = {}
    for cls in torch.unique(key).tolist():
        rows = torch.nonzero(key == cls).flatten()
        order = torch.argsort(probabilities[rows, cls], descending=True, stable=True)
        by_class[int(cls)] = rows[order].tolist()
    return by_class


def _font(size: int = 11) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType
        return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, width: int, font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def _square(pixels: np.ndarray | Tensor, panel: int) -> Image.Image:
    """Fit an image into a ``panel`` x ``panel`` white square, aspect ratio kept."""
    array = pixels.permute(1, 2, 0).numpy() if isinstance(pixels, Tensor) else pixels
    image = Image.fromarray((np.clip(array, 0, 1) * 255).round().astype(np.uint8))
    scale = panel / max(image.width, image.height)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    image = image.resize(size, Image.Resampling.BILINEAR if scale < 1 else Image.Resampling.NEAREST)
    square = Image.new("RGB", (panel, panel), "white")
    square.paste(image, ((panel - size[0]) // 2, (panel - size[1]) // 2))
    return square


def _blank(panel: int, text: str) -> Image.Image:
    image = Image.new("RGB", (panel, panel), (235, 235, 235))
    draw = ImageDraw.Draw(image)
    draw.text((MARGIN, panel // 2 - 6), _fit(draw, text, panel - 2 * MARGIN, _font()), fill="black", font=_font())
    return image


def compose(panels: Sequence[tuple[Image.Image, Sequence[str]]], panel: int) -> Image.Image:
    """Panels side by side, each under up to :data:`TEXT_LINES` lines of text."""
    header = TEXT_LINES * LINE_HEIGHT + MARGIN
    canvas = Image.new("RGB", (len(panels) * (panel + MARGIN) + MARGIN, panel + header + MARGIN), "white")
    draw, font = ImageDraw.Draw(canvas), _font()
    for column, (image, lines) in enumerate(panels):
        left = MARGIN + column * (panel + MARGIN)
        for number, line in enumerate(list(lines)[:TEXT_LINES]):
            top = MARGIN // 2 + number * LINE_HEIGHT
            draw.text((left, top), _fit(draw, line, panel, font), fill="black", font=font)
        canvas.paste(image, (left, header))
    return canvas


def _probability(store: ResultStore, row: int, cls: int) -> str:
    return f"p={float(store.probabilities[row, cls]):.3f}"


def comparison_grid(
    store: ResultStore, record: ImageRecord, gamma: float, exemplars: dict[int, list[int]], panel: int = 224
) -> Image.Image:
    """The four-panel figure of one explained image."""
    from finercam.viz import overlay

    if record.row is None:
        raise InvalidArgumentError(f"image {record.id!r} was skipped ({record.reason}); it has no maps")
    row = record.row
    picture = display_image(store, record)
    size = tuple(picture.shape[-2:])
    target, prediction, label = int(store.targets[row]), int(store.predictions[row]), int(store.labels[row])
    references = [int(d) for d in store.references[row].tolist() if d >= 0]
    name = store.class_name
    truth = f"true: {name(label)}" if label >= 0 else "true: unknown"
    predicted = f"pred ({_probability(store, row, prediction)}): {name(prediction)}"
    panels: list[tuple[Image.Image, Sequence[str]]] = [(_square(picture, panel), [record.id, truth, predicted])]
    if references:
        first = references[0]
        candidates = [r for r in exemplars.get(first, []) if r != row]
        caption = [f"reference d1 ({_probability(store, row, first)}):", name(first)]
        if candidates:
            exemplar = store.ok_records()[candidates[0]]
            try:
                panels.append((_square(display_image(store, exemplar), panel), [*caption, f"exemplar: {exemplar.id}"]))
            except Exception:  # the exemplar is an aside: a blank panel, never the image's grid lost
                panels.append((_blank(panel, "exemplar unreadable"), caption))
        else:
            panels.append((_blank(panel, "no image of this class in the store"), caption))
    else:
        panels.append((_blank(panel, "no reference class (C = 1)"), ["no reference", "", ""]))
    title = get_method(store.method).title
    base = overlay(picture, render_baseline(store, row, size), channels="first")  # type: ignore[arg-type]
    finer = overlay(picture, render_map(store, row, gamma, size), channels="first")  # type: ignore[arg-type]
    panels.append((_square(base, panel), [f"{title} (baseline, gamma 0)",
                                          f"c ({_probability(store, row, target)}): {name(target)}"]))
    versus = ", ".join(name(d) for d in references) or "nothing"
    panels.append((_square(finer, panel), [f"Finer-{title} (gamma {gamma:g})", f"c: {name(target)}", f"vs {versus}"]))
    return compose(panels, panel)


def save_grids(
    store: ResultStore,
    out: str | Path,
    gamma: float | None = None,
    *,
    ids: Sequence[str] | None = None,
    limit: int | None = None,
    panel: int = 224,
) -> tuple[list[Path], list[tuple[str, str]]]:
    """Write one grid PNG per explained image (or per id in ``ids``) into ``out/<explained class>/``.

    Returns:
        The files written, and ``(id, reason)`` of images left out.
    """
    check_panel(panel)
    gamma = default_gamma(store) if gamma is None else float(gamma)
    records = list(store.ok_records())
    if ids is not None:
        by_id = {record.id: record for record in store.records}
        unknown = [image_id for image_id in ids if image_id not in by_id]
        if unknown:
            raise InvalidArgumentError(f"ids not in the store: {unknown[:10]}")
        records = [by_id[image_id] for image_id in ids]
    if limit is not None:
        records = records[:limit]
    exemplars = exemplar_rows(store)
    written, skipped = [], []
    root = claim_folder(out, "comparison grids", store, {"gamma": gamma, "panel": panel})
    for record in records:
        if record.row is None:
            skipped.append((record.id, f"skipped by the run: {record.reason}"))
            continue
        try:
            grid = comparison_grid(store, record, gamma, exemplars, panel)
        except Exception as error:  # one image that cannot be drawn is left out with its reason, never the rest
            skipped.append((record.id, left_out_reason(error)))
            continue
        folder = safe_component(store.class_name(int(store.targets[record.row])))
        written.append(save_png(inside(root, folder, f"{unique_stem(record.id)}.png"),
                                np.asarray(grid, dtype=np.float32) / 255.0))
    return written, skipped
