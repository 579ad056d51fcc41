r"""Exports of a result store: PNG overlays, and the official Finer-CAM per-image ``.npy`` dictionaries.

**Official format** (``generate_cams.py`` of github.com/Imageomics/Finer-CAM): one ``<class>_<image stem>.npy`` per
image (``<class>``: the image's labelled class, else the explained one), written with ``np.save`` of a pickled
``dict`` (read it with ``np.load(path, allow_pickle=True).item()``)::

    {"Baseline":      {"highres": float16 (1, H, W), "main_category": [c], "comparison_categories": [[d_1..d_T]]},
     "Finer-Default": {... the same keys, at the store's gamma; finercam adds "gamma"}}

``highres`` is the map in ``[0, 1]`` at the original image size when the preprocessing keeps the whole image (as the
official DINOv2 pipeline does), else at the model's input size (a centre crop: the original has no pixel-exact
counterpart). The official ``Finer-Compare`` entry (one reference at ``\gamma = 1``) is not written: it needs a
separate pass with ``T = 1`` (run ``finercam run --num-references 1 --gammas 1`` for it). Names are made safe
(:mod:`finercam.dataset.names`); an image whose safe name repeats gets a hash suffix.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from finercam.dataset.names import inside, safe_component, short_hash, unique_stem
from finercam.dataset.outputs import claim_folder
from finercam.dataset.render import default_gamma, render_baseline, render_map
from finercam.dataset.store_reader import ImageRecord, ResultStore
from finercam.images import ImageReadError, load_image
from finercam.models.preprocess import Preprocess


@dataclass
class ExportReport:
    """Files written, and images left out with the reason."""

    written: list[Path] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def left_out_reason(error: Exception) -> str:
    """Why a view or export left one image out: the message of an expected error (an image that cannot be read
    now), else the error's type and message, so that one bad image never stops the whole job."""
    if isinstance(error, ImageReadError):
        return str(error)
    return f"could not be rendered ({type(error).__name__}: {error})"


def store_preprocess(store: ResultStore) -> Preprocess:
    """The run's :class:`Preprocess`, rebuilt from the manifest."""
    return Preprocess(**store.config["preprocess"])


def display_image(store: ResultStore, record: ImageRecord) -> Tensor:
    """The picture the maps are drawn on, ``(3, H, W)`` in ``[0, 1]``: the whole image (longest side at most 1000)
    when the preprocessing keeps it whole, else the model's view (crop included, no normalisation).

    Raises:
        ImageReadError: the file is not the image the run explained (its size changed since: edited, rotated or
            replaced), so the stored maps do not belong on it.
    """
    image = load_image(record.path)
    if record.row is not None:
        height, width = (int(v) for v in store.image_sizes[record.row].tolist())
        if (image.height, image.width) != (height, width):
            raise ImageReadError(
                f"{record.path} is {image.width} x {image.height} pixels, but the run explained a {width} x {height} "
                "image there: it changed since, so the stored maps do not belong on it (run again to explain it)"
            )
    return store_preprocess(store).display_geometry()(image)


def save_png(path: Path, pixels: np.ndarray | Tensor) -> Path:
    """Save an ``(H, W, 3)`` array (or ``(3, H, W)`` tensor) in ``[0, 1]`` as an 8-bit PNG, atomically."""
    array = pixels.permute(1, 2, 0).numpy() if isinstance(pixels, Tensor) else pixels
    image = Image.fromarray((np.clip(array, 0, 1) * 255).round().astype(np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue())  # a derived file: rewritten by the next export if a crash cut it
    return path


def _rows(store: ResultStore, limit: int | None) -> list[ImageRecord]:
    records = list(store.ok_records())
    return records[:limit] if limit is not None else records


def export_overlays(
    store: ResultStore, out: str | Path, gamma: float | None = None, *, limit: int | None = None, alpha: float = 0.5
) -> ExportReport:
    """One PNG per image: the Finer-CAM map at ``gamma`` over the image, in ``out/<explained class>/``."""
    from finercam.viz import overlay

    gamma = default_gamma(store) if gamma is None else float(gamma)
    root, report = claim_folder(out, "png overlays", store, {"gamma": gamma, "alpha": alpha}), ExportReport()
    for record in _rows(store, limit):
        assert record.row is not None
        try:
            picture = display_image(store, record)
            heat = render_map(store, record.row, gamma, tuple(picture.shape[-2:]))  # type: ignore[arg-type]
            blended = overlay(picture, heat, alpha=alpha, channels="first")
        except Exception as error:  # one image that cannot be drawn is left out with its reason, never the rest
            report.skipped.append((record.id, left_out_reason(error)))
            continue
        folder = safe_component(store.class_name(int(store.targets[record.row])))
        path = inside(root, folder, f"{unique_stem(record.id)}.png")
        report.written.append(save_png(path, blended))
    return report


def official_name(store: ResultStore, record: ImageRecord, used: set[str]) -> str:
    """``<class>_<stem>.npy`` as the official scripts name it (they read one folder per class, so ``<class>`` is the
    image's labelled class; for an unlabelled image, the explained class ``c``), made safe and unique."""
    assert record.row is not None
    label = int(store.labels[record.row])
    named = label if label >= 0 else int(store.targets[record.row])
    name = f"{safe_component(store.class_name(named))}_{safe_component(Path(record.id).stem)}"
    if name in used:
        name = f"{name}-{short_hash(record.id)}"
    used.add(name)
    return f"{name}.npy"


def official_dict(store: ResultStore, row: int, gamma: float) -> dict[str, dict[str, object]]:
    """The official per-image dictionary of one row (see the module documentation)."""
    crop = store.config["preprocess"].get("crop") is not None
    size = tuple((store.input_sizes if crop else store.image_sizes)[row].tolist())
    target = int(store.targets[row])
    references = [int(d) for d in store.references[row].tolist() if d >= 0]

    def entry(heat: Tensor) -> dict[str, object]:
        highres = heat.to(torch.float16).numpy()[None]
        return {"highres": highres, "main_category": [target], "comparison_categories": [references]}

    finer = entry(render_map(store, row, gamma, size))  # type: ignore[arg-type]
    finer["gamma"] = gamma
    return {"Baseline": entry(render_baseline(store, row, size)), "Finer-Default": finer}  # type: ignore[arg-type]


def export_official(
    store: ResultStore, out: str | Path, gamma: float | None = None, *, limit: int | None = None
) -> ExportReport:
    """Write the official per-image ``.npy`` dictionaries into ``out``."""
    gamma = default_gamma(store) if gamma is None else float(gamma)
    root, report, used = claim_folder(out, "official .npy files", store, {"gamma": gamma}), ExportReport(), set()
    for record in _rows(store, limit):
        assert record.row is not None
        buffer = io.BytesIO()
        try:
            np.save(buffer, official_dict(store, record.row, gamma), allow_pickle=True)  # type: ignore[arg-type]
        except Exception as error:  # one row that cannot be rendered is left out with its reason, never the rest
            report.skipped.append((record.id, left_out_reason(error)))
            continue
        path = inside(root, official_name(store, record, used))
        path.write_bytes(buffer.getvalue())
        report.written.append(path)
    return report
