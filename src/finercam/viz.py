"""Overlays of maps on images and a labelled comparison figure (needs matplotlib: ``pip install finercam[viz]``)."""

from __future__ import annotations

import textwrap
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from finercam.errors import InvalidArgumentError, MissingDependencyError

ArrayLike = Tensor | np.ndarray
__all__ = ["Channels", "Column", "MissingDependencyError", "colormap", "figure", "overlay", "save_comparison"]


def require_matplotlib() -> None:
    """Check that figures can be drawn, before a command does its work.

    Raises:
        MissingDependencyError: matplotlib is not installed (``pip install finercam[viz]``).
    """
    _matplotlib()


def _matplotlib() -> ModuleType:
    """Import matplotlib, or explain how to install it."""
    try:
        import matplotlib
    except ImportError as error:
        raise MissingDependencyError(
            "finercam's figures need matplotlib, which is not installed: pip install finercam[viz]"
        ) from error
    return matplotlib


def colormap(name: str) -> Any:
    """The matplotlib colormap ``name`` (``"jet"``, ``"viridis"``), or a :class:`MissingDependencyError`."""
    return _matplotlib().colormaps[name]


@contextmanager
def figure(**options: Any) -> Iterator[Any]:
    """A new ``matplotlib.figure.Figure(**options)`` to draw on and save inside the ``with`` block.

    It is made without pyplot, so the caller's backend, open figures and notebook display are left as they were,
    and with text drawn literally (``text.parse_math`` off), so that a class name or prompt holding ``$`` is
    written as given instead of being read as mathematics (and failing to parse).
    """
    matplotlib = _matplotlib()
    from matplotlib.figure import Figure

    with matplotlib.rc_context({"text.parse_math": False}):
        yield Figure(**options)


Channels = Literal["first", "last"]
"""Where an image keeps its colour channels: ``"first"`` ``(C, H, W)`` (torch) or ``"last"`` ``(H, W, C)`` (numpy,
Pillow, matplotlib)."""


def _channels_of(image: ArrayLike, channels: Channels | None) -> Channels:
    """The layout of ``image``: as given, else torch's ``"first"`` for a tensor and ``"last"`` for an array.

    The layout is never guessed from the shape: an image 1 or 3 pixels wide looks like a channel axis.
    """
    if channels is None:
        return "first" if isinstance(image, Tensor) else "last"
    if channels not in ("first", "last"):
        raise InvalidArgumentError(
            f"channels must be 'first' (C, H, W) or 'last' (H, W, C); got {channels!r}"
        )
    return channels


def _to_numpy_image(image: ArrayLike, channels: Channels | None = None) -> np.ndarray:
    """An image as a float ``(H, W, 3)`` array in ``[0, 1]``: integer pixels over their dtype's full range (255 for
    ``uint8``), floats as they are, or min-max stretched when outside ``[0, 1]`` (normalised model inputs).

    Args:
        image: ``(C, H, W)`` or ``(H, W, C)`` pixels with ``C`` 1 or 3 (tensor or array), or ``(H, W)`` gray.
        channels: where the channel axis is (see :func:`_channels_of`; ``None``: first for a tensor, last for an
            array).
    """
    layout = _channels_of(image, channels)
    if isinstance(image, Tensor):
        raw = image.detach().cpu()
        raw = (raw.float() if raw.is_floating_point() else raw).numpy()
    else:
        raw = np.asarray(image)
    if raw.dtype == bool:
        array = raw.astype(float)
    elif np.issubdtype(raw.dtype, np.integer):  # 8- or 16-bit pixels: their full scale is white
        array = raw.astype(float) / float(np.iinfo(raw.dtype).max)
    else:
        array = raw.astype(float)
    if array.ndim == 2:
        array = array[..., None]
    elif array.ndim == 3 and layout == "first":
        array = array.transpose(1, 2, 0)
    expected = "(C, H, W)" if layout == "first" else "(H, W, C)"
    if array.ndim != 3 or array.shape[-1] not in (1, 3) or 0 in array.shape:
        raise InvalidArgumentError(
            f"expected an image {expected} with C = 1 or 3 (channels={layout!r}), or (H, W); got shape "
            f"{tuple(image.shape)}"
        )
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    low, high = float(array.min()), float(array.max())
    if (low < 0 or high > 1) and high > low:  # normalised pixels (float): stretch for display
        array = (array - low) / (high - low)
    return np.clip(array, 0.0, 1.0)


def _to_numpy_map(cam: ArrayLike) -> np.ndarray:
    array = cam.detach().cpu().float().numpy() if isinstance(cam, Tensor) else np.asarray(cam, dtype=float)
    if array.ndim != 2:
        raise InvalidArgumentError(f"expected a map (H, W); got shape {array.shape}")
    return np.clip(array, 0.0, 1.0)


def overlay(
    image: ArrayLike, cam: ArrayLike, *, alpha: float = 0.5, cmap: str = "jet", channels: Channels | None = None
) -> np.ndarray:
    """Blend a colour-mapped map in ``[0, 1]`` over an image: ``(1 - alpha) * image + alpha * cmap(map)``.

    Args:
        image: ``(3, H, W)`` or ``(H, W, 3)`` pixels: integers (``uint8``, ``uint16``) on their full range
            (``np.asarray(pil_image)`` as it is), floats in ``[0, 1]`` (stretched to it if outside it, e.g.
            normalised inputs).
        cam: ``(H, W)`` map in ``[0, 1]``, e.g. ``result.maps[i]``.
        alpha: weight of the map.
        cmap: a matplotlib colormap name (``"jet"``, ``"inferno"``).
        channels: ``"first"`` for ``(3, H, W)``, ``"last"`` for ``(H, W, 3)``; ``None`` (default): first for a
            tensor, last for a numpy array. Never guessed from the shape, so images 1 or 3 pixels wide work.

    Returns:
        An ``(H, W, 3)`` float array in ``[0, 1]``.
    """
    colours_of = colormap(cmap)
    pixels, heat = _to_numpy_image(image, channels), _to_numpy_map(cam)
    if pixels.shape[:2] != heat.shape:
        raise InvalidArgumentError(
            f"image is {pixels.shape[:2]} (height, width) but the map is {heat.shape}; resize one to the other"
        )
    colours = colours_of(heat)[..., :3]
    return np.clip((1 - alpha) * pixels + alpha * colours, 0.0, 1.0)


@dataclass(frozen=True)
class Column:
    """One column of :func:`save_comparison`.

    Attributes:
        title: the column header (first row).
        maps: ``(B, H, W)`` maps in ``[0, 1]`` to overlay; ``None`` shows the image alone.
        captions: one line (or a few) per row, under the header.
        outlines: ``(B, H, W)`` boolean masks drawn as white contours, e.g. the difference mask.
        mark_peak: mark each map's maximum with a cross (the pointing game's answer).
    """

    title: str
    maps: Tensor | None = None
    captions: Sequence[str] | None = None
    outlines: Tensor | None = None
    mark_peak: bool = True


TITLE_FONT_SIZE = 8


def wrap_title(text: str, width: int) -> str:
    """Every line of ``text`` broken to at most ``width`` characters (at spaces and hyphens; a longer word is cut),
    so that long class names stay over their own panel."""
    return "\n".join(
        textwrap.fill(line, width, break_on_hyphens=True, break_long_words=True) if line else line
        for line in text.split("\n")
    )


def save_comparison(
    path: str | Path,
    images: Tensor,
    columns: Sequence[Column],
    *,
    row_labels: Sequence[str] | None = None,
    suptitle: str | None = None,
    cmap: str = "jet",
    alpha: float = 0.5,
    panel_inches: float = 2.3,
    dpi: int = 110,
) -> Path:
    """Save a grid figure: one row per image, one panel per :class:`Column`; returns the path written.

    Args:
        path: the output file (``.png``, ``.pdf``, ``.svg``...); parent folders are created.
        images: ``(B, 3, H, W)`` images in ``[0, 1]`` (or normalised pixels, stretched for display).
        columns: what to show in each column.
        row_labels: one label per row, at the left of the row.
        suptitle: a title over the whole figure.
    """
    rows, cols = images.shape[0], len(columns)
    width = max(12, int(panel_inches * 72 / (TITLE_FONT_SIZE * 0.6)))  # characters that fit over a panel
    titles = [
        [wrap_title((f"{column.title}\n" if row == 0 else "")
                    + (column.captions[row] if column.captions is not None else ""), width) for column in columns]
        for row in range(rows)
    ]
    lines = [max(title.count("\n") + 1 for title in row_titles) for row_titles in titles]
    height = sum(panel_inches + 0.25 + 0.15 * count for count in lines) + 0.4
    with figure(figsize=(panel_inches * cols, height)) as drawing:
        axes = drawing.subplots(rows, cols, squeeze=False)
        for column_index, column in enumerate(columns):
            for row in range(rows):
                axis: Any = axes[row, column_index]
                picture = (
                    _to_numpy_image(images[row], "first")
                    if column.maps is None
                    else overlay(images[row], column.maps[row], alpha=alpha, cmap=cmap, channels="first")
                )
                axis.imshow(picture, interpolation="nearest")
                if column.outlines is not None:
                    mask = column.outlines[row].detach().cpu().float().numpy()
                    if mask.any():
                        axis.contour(mask, levels=[0.5], colors="white", linewidths=1.2)
                if column.maps is not None and column.mark_peak and bool(column.maps[row].max() > 0):
                    peak = int(torch.argmax(column.maps[row]))  # a map zero everywhere has no peak to mark
                    y, x = divmod(peak, column.maps.shape[-1])
                    axis.plot(x, y, marker="x", color="white", markersize=7, markeredgewidth=2)
                axis.set_title(titles[row][column_index], fontsize=TITLE_FONT_SIZE, fontweight="normal")
                axis.set_xticks([])
                axis.set_yticks([])
                if column_index == 0 and row_labels is not None:
                    axis.set_ylabel(row_labels[row], fontsize=8)
        if suptitle:
            drawing.suptitle(suptitle, fontsize=10)
        drawing.tight_layout()
        output = Path(path)
        if not output.suffix:
            output = output.with_suffix(".png")
        output.parent.mkdir(parents=True, exist_ok=True)
        drawing.savefig(output, dpi=dpi, bbox_inches="tight", pad_inches=0.1)  # no title cut, no blank margin
    return output
