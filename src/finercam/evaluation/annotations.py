"""Ground-truth regions for the localization metrics, read from annotation files and carried through preprocessing.

Three sources, detected by :func:`load_regions`:

* a :mod:`finercam.synth` dataset's ``annotations.json``: the *difference mask* between the explained class ``c`` and
  its most similar reference ``d`` (the visible parts whose appearance differs between the two classes);
* the CUB-200-2011 folder (``images.txt``, ``bounding_boxes.txt``, ``parts/part_locs.txt``): the bird's bounding box
  (``kind="box"``) or its visible part keypoints (``kind="parts"``, disks of ``keypoint_radius`` pixels);
* a JSON file ``{"images": {"<path relative to the file's folder>": {"boxes": [[x0, y0, x1, y1], ...],
  "keypoints": [[x, y], ...], "mask": "<mask image relative to the file's folder>"}}}`` (any of the three keys;
  boxes and keypoints in pixels of the original image, a mask is non-zero inside).

Coordinates are given on the original images; :meth:`Preprocess.point_transform
<finercam.models.Preprocess.point_transform>` carries them to the model's input, so the regions stay aligned whatever
the resize and crop.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from finercam.errors import InvalidArgumentError
from finercam.metrics import boxes_to_masks, keypoints_to_masks
from finercam.models.preprocess import Preprocess

DEFAULT_KEYPOINT_RADIUS = 0.04  # of the shorter input side
REGION_KINDS = ("difference", "box", "parts", "mask")


@dataclass(frozen=True)
class ImageItem:
    """One image of the evaluated dataset: its file, its size before preprocessing, and its label if known."""

    path: Path
    width: int
    height: int
    label: int | None = None


class Regions(Protocol):
    """A source of ground-truth regions."""

    description: str

    def masks(self, items: Sequence[ImageItem], preprocess: Preprocess, size: tuple[int, int], targets: Tensor,
              references: Tensor, class_names: Sequence[str] | None) -> tuple[Tensor, Tensor]:
        """``(B, H, W)`` bool regions at input size, and ``(B,)`` bool: whether an image has a region at all."""


def transform_mask(mask: Tensor, preprocess: Preprocess, size: tuple[int, int]) -> Tensor:
    """A mask ``(h, w)`` on the original image, carried to the preprocessed ``size`` (nearest neighbour, the same
    geometry as the image: each output pixel centre is mapped back through :meth:`Preprocess.point_transform`)."""
    height, width = mask.shape
    sx, sy, dx, dy = preprocess.point_transform(width, height)
    xs = ((torch.arange(size[1], dtype=torch.float64) + 0.5 - dx) / sx).floor().long()
    ys = ((torch.arange(size[0], dtype=torch.float64) + 0.5 - dy) / sy).floor().long()
    inside = ((ys >= 0) & (ys < height))[:, None] & ((xs >= 0) & (xs < width))[None]
    picked = mask[ys.clamp(0, height - 1)][:, xs.clamp(0, width - 1)]
    return picked.bool() & inside


def _transform_points(points: Tensor, item: ImageItem, preprocess: Preprocess) -> Tensor:
    sx, sy, dx, dy = preprocess.point_transform(item.width, item.height)
    scale = torch.tensor([sx, sy], dtype=torch.float64)
    shift = torch.tensor([dx, dy], dtype=torch.float64)
    return points.double() * scale + shift


def _relative(path: Path, root: Path) -> str | None:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return None


class SynthRegions:
    """Difference masks of a :mod:`finercam.synth` dataset (``annotations.json``)."""

    description = "difference mask between the target and its first (most similar) reference"

    def __init__(self, path: Path, annotation: dict) -> None:
        from finercam.synth.io import decode_part_map
        from finercam.synth.spec import SynthConfig

        self.root = path.parent
        self.config = SynthConfig.from_dict({k: tuple(v) if isinstance(v, list) else v
                                             for k, v in annotation["config"].items()})
        self.class_names = [entry["name"] for entry in annotation["classes"]]
        size = self.config.image_size
        self._maps = {record["path"]: record["part_map"] for record in annotation["images"]}
        self._decode = lambda text: torch.from_numpy(decode_part_map(text, size).copy())

    def masks(self, items: Sequence[ImageItem], preprocess: Preprocess, size: tuple[int, int], targets: Tensor,
              references: Tensor, class_names: Sequence[str] | None) -> tuple[Tensor, Tensor]:
        from finercam.synth import difference_mask

        if class_names is None or sorted(class_names) != sorted(self.class_names):
            raise InvalidArgumentError(
                "the synthetic annotations name classes by the dataset's class names, but the model's classes "
                f"{list(class_names or [])[:3]}... are not those {self.class_names[:3]}...; evaluate a model trained "
                "on this dataset (e.g. embedded:cnn)"
            )
        to_label = torch.tensor([self.class_names.index(name) for name in class_names])
        regions = torch.zeros(len(items), *size, dtype=torch.bool)
        valid = torch.zeros(len(items), dtype=torch.bool)
        for i, item in enumerate(items):
            key = _relative(item.path, self.root)
            if key is None or key not in self._maps:
                continue
            part_map = self._decode(self._maps[key])[None]
            c, d = to_label[targets[i].cpu()], to_label[references[i].cpu()]
            difference = difference_mask(part_map, c.view(1), d.view(1), self.config)[0]
            regions[i] = transform_mask(difference, preprocess, size)
            valid[i] = True
        return regions, valid


class BoxKeypointRegions:
    """Boxes, keypoints or mask images per image, keyed by path relative to ``root`` (CUB or the JSON format)."""

    def __init__(self, root: Path, entries: dict[str, dict], kind: str, keypoint_radius: float | None,
                 description: str) -> None:
        self.root, self.entries, self.kind, self.radius = root, entries, kind, keypoint_radius
        self.description = description

    def masks(self, items: Sequence[ImageItem], preprocess: Preprocess, size: tuple[int, int], targets: Tensor,
              references: Tensor, class_names: Sequence[str] | None) -> tuple[Tensor, Tensor]:
        regions = torch.zeros(len(items), *size, dtype=torch.bool)
        valid = torch.zeros(len(items), dtype=torch.bool)
        radius = DEFAULT_KEYPOINT_RADIUS * min(size) if self.radius is None else self.radius
        for i, item in enumerate(items):
            key = _relative(item.path, self.root)
            entry = self.entries.get(key) if key is not None else None
            if not entry:
                continue
            if self.kind == "box" and entry.get("boxes"):
                boxes = torch.tensor(entry["boxes"], dtype=torch.float64).view(-1, 2, 2)
                corners = torch.stack([_transform_points(b, item, preprocess) for b in boxes]).view(1, -1, 4)
                regions[i] = boxes_to_masks(corners, None, size)[0]
            elif self.kind == "parts" and entry.get("keypoints"):
                points = _transform_points(torch.tensor(entry["keypoints"], dtype=torch.float64).view(-1, 2), item,
                                           preprocess)
                regions[i] = keypoints_to_masks(points[None], None, size, radius)[0]
            elif self.kind == "mask" and entry.get("mask"):
                with Image.open(self.root / entry["mask"]) as image:
                    mask = torch.from_numpy(np.array(image.convert("L")) > 0)
                if tuple(mask.shape) != (item.height, item.width):
                    raise InvalidArgumentError(
                        f"mask {entry['mask']!r} is {mask.shape[1]}x{mask.shape[0]} but its image {key!r} is "
                        f"{item.width}x{item.height}"
                    )
                regions[i] = transform_mask(mask, preprocess, size)
            else:
                continue
            valid[i] = True
        return regions, valid


def _read_table(path: Path, columns: int) -> list[list[str]]:
    if not path.is_file():
        raise InvalidArgumentError(f"the CUB annotations need {path}, which does not exist")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) < columns:
            raise InvalidArgumentError(f"{path}:{number}: expected {columns} fields, got {line!r}")
        rows.append(fields)
    return rows


def cub_regions(root: Path, kind: str, keypoint_radius: float | None) -> BoxKeypointRegions:
    """The CUB-200-2011 bounding boxes or part keypoints; image paths are relative to ``root/images``."""
    paths = {fields[0]: fields[1] for fields in _read_table(root / "images.txt", 2)}
    entries: dict[str, dict] = {path: {} for path in paths.values()}
    if kind == "box":
        for image_id, x, y, w, h in (row[:5] for row in _read_table(root / "bounding_boxes.txt", 5)):
            x0, y0 = float(x), float(y)
            entries[paths[image_id]].setdefault("boxes", []).append([x0, y0, x0 + float(w), y0 + float(h)])
    else:
        for image_id, _part, x, y, visible in (row[:5] for row in _read_table(root / "parts" / "part_locs.txt", 5)):
            if float(visible) > 0:
                entries[paths[image_id]].setdefault("keypoints", []).append([float(x), float(y)])
    what = "bounding box" if kind == "box" else "visible part keypoints (disks)"
    return BoxKeypointRegions(root / "images", entries, kind, keypoint_radius, f"CUB-200-2011 {what}")


def load_regions(path: str | Path, kind: str | None = None, keypoint_radius: float | None = None) -> Regions:
    """The regions of an annotation file or folder (see the module docstring).

    Args:
        path: a synthetic ``annotations.json``, a CUB-200-2011 folder, or a JSON regions file.
        kind: which region: ``difference`` (synthetic; the default there), ``box`` (default for CUB and JSON files
            with boxes), ``parts`` (keypoints) or ``mask``.
        keypoint_radius: disk radius in input pixels for keypoints (default 4% of the shorter input side).
    """
    path = Path(path)
    if kind is not None and kind not in REGION_KINDS:
        raise InvalidArgumentError(f"unknown region kind {kind!r}; use one of {list(REGION_KINDS)}")
    if path.is_dir() and (path / "images.txt").is_file():
        if kind not in (None, "box", "parts"):
            raise InvalidArgumentError(f"CUB-200-2011 annotations give 'box' or 'parts' regions, not {kind!r}")
        return cub_regions(path, kind or "box", keypoint_radius)
    if path.is_dir() and (path / "annotations.json").is_file():
        path = path / "annotations.json"
    if not path.is_file():
        raise InvalidArgumentError(
            f"annotations {str(path)!r} not found: give a synthetic dataset's annotations.json, a CUB-200-2011 folder "
            "(with images.txt) or a JSON regions file"
        )
    try:
        annotation = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InvalidArgumentError(f"annotations {str(path)!r} are not valid JSON: {error}") from None
    if isinstance(annotation, dict) and annotation.get("format") == "finercam-synth":
        if kind not in (None, "difference"):
            raise InvalidArgumentError(f"synthetic annotations give 'difference' regions, not {kind!r}")
        return SynthRegions(path, annotation)
    images = annotation.get("images") if isinstance(annotation, dict) else None
    if not isinstance(images, dict):
        raise InvalidArgumentError(
            f"{str(path)!r}: expected {{\"images\": {{\"relative/path.jpg\": {{\"boxes\": [[x0, y0, x1, y1]], "
            "\"keypoints\": [[x, y]], \"mask\": \"mask.png\"}}}} (see finercam.evaluation.annotations)"
        )
    if kind is None:
        present = {key for entry in images.values() if isinstance(entry, dict) for key in entry}
        kind = next((k for k, key in (("box", "boxes"), ("mask", "mask"), ("parts", "keypoints")) if key in present),
                    "box")
    if kind == "difference":
        raise InvalidArgumentError("difference regions come only from synthetic annotations")
    return BoxKeypointRegions(path.parent, images, kind, keypoint_radius, f"{kind} regions from {path.name}")
