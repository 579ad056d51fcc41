"""Ground-truth regions for the localization metrics, read from annotation files and carried through preprocessing.

Three sources, detected by :func:`load_regions`:

* a :mod:`finercam.synth` dataset's ``annotations.json``: the *difference mask* between the explained class ``c`` and
  its most similar reference ``d`` (the visible parts whose appearance differs between the two classes);
* the CUB-200-2011 folder (``images.txt``, ``bounding_boxes.txt``, ``parts/part_locs.txt``): the bird's bounding box
  (``kind="box"``) or its visible part keypoints (``kind="parts"``, disks of ``keypoint_radius`` pixels);
* a JSON file ``{"images": {"<path relative to the file's folder>": {"boxes": [[x0, y0, x1, y1], ...],
  "keypoints": [[x, y], ...], "mask": "<mask image relative to the file's folder>"}}}`` (any of the three keys;
  boxes and keypoints in pixels of the original image, a mask is non-zero inside).

Every entry is checked when the file is read (:mod:`finercam.evaluation.region_files`), and :func:`check_coverage`
checks, before an evaluation starts, how many of its images have a region and that each region fits its image.

Coordinates are given on the original images; :meth:`Preprocess.point_transform
<finercam.models.Preprocess.point_transform>` carries them to the model's input, so the regions stay aligned whatever
the resize and crop.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from finercam.errors import InvalidArgumentError
from finercam.evaluation.region_files import (
    FIELDS,
    check_entry,
    check_fits,
    image_size,
    read_cub_boxes,
    read_cub_images,
    read_cub_keypoints,
)
from finercam.metrics import boxes_to_masks, keypoints_to_masks
from finercam.models.preprocess import Preprocess

DEFAULT_KEYPOINT_RADIUS = 0.04  # of the shorter input side
REGION_KINDS = ("difference", "box", "parts", "mask")
_FIELD_OF = {"box": "boxes", "mask": "mask", "parts": "keypoints"}  # the JSON field of each kind, by precedence


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
    root: Path  # image paths are matched relative to this folder

    def identity(self) -> dict[str, Any]:
        """What the regions are (kind, radius, source and a hash of the annotations): recorded with the results, and a
        resumed evaluation must have the same."""

    def annotated(self, paths: Sequence[Path]) -> list[bool]:
        """Whether each image has a region; raises :class:`InvalidArgumentError` for one that cannot fit its image."""

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


def _digest(value: object) -> str:
    """A short SHA-256 of a JSON-like value (the annotations as read), the same for the same content."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


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
        self._identity = {"kind": "difference", "source": str(path.resolve()), "sha256": _digest(annotation)}

    def identity(self) -> dict[str, Any]:
        return dict(self._identity)

    def annotated(self, paths: Sequence[Path]) -> list[bool]:
        """Whether each image is one of the dataset's (its path relative to the annotations' folder is listed)."""
        return [_relative(path, self.root) in self._maps for path in paths]

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
    """Boxes, keypoints or mask images per image, keyed by path relative to ``root`` (CUB or the JSON format).

    ``entries`` must be checked already (:func:`~finercam.evaluation.region_files.check_entry`); ``source`` names
    the annotation file in errors. An image whose region is empty at the model's input (cropped away) has no region:
    it is left out of the localization metrics rather than scored as a miss.
    """

    def __init__(self, root: Path, entries: dict[str, dict], kind: str, keypoint_radius: float | None,
                 description: str, source: str = "the annotations", tail: int | None = None) -> None:
        self.root, self.entries, self.kind, self.radius = root, entries, kind, keypoint_radius
        self.description, self.source, self.tail = description, source, tail
        self._checked: dict[Path, bool] = {}
        self._digest = _digest(entries)

    def identity(self) -> dict[str, Any]:
        return {"kind": self.kind, "keypoint_radius": self.radius if self.kind == "parts" else None,
                "source": self.source, "root": str(self.root.resolve()), "sha256": self._digest}

    def _entry(self, path: Path) -> tuple[str | None, dict | None]:
        """The image's key and its entry when it has a region of this kind. The key is the path relative to
        :attr:`root`; with ``tail``, an image elsewhere (a copy of a split) is matched by its last ``tail`` path
        parts (CUB: ``<class folder>/<file>``, unique in the dataset)."""
        key = _relative(path, self.root)
        if (key is None or key not in self.entries) and self.tail:
            key = "/".join(path.parts[-self.tail:])
        entry = self.entries.get(key) if key is not None else None
        return key, entry if entry and entry.get(_FIELD_OF[self.kind]) else None

    def annotated(self, paths: Sequence[Path]) -> list[bool]:
        """Whether each image has a region of this kind, each checked against the image's size (read from its
        header) the first time: a box wholly outside the image, a keypoint outside it or a mask of another size is
        refused. Unreadable images are not checked: the evaluation skips them."""
        found = []
        for path in paths:
            if path not in self._checked:
                key, entry = self._entry(path)
                size = image_size(path) if entry is not None else None
                if key is not None and entry is not None and size is not None:
                    check_fits(self.source, key, entry, self.kind, size, self.root)
                self._checked[path] = entry is not None
            found.append(self._checked[path])
        return found

    def _mask(self, name: str, key: str, item: ImageItem) -> Tensor:
        try:
            with Image.open(self.root / name) as image:
                mask = torch.from_numpy(np.array(image.convert("L")) > 0)
        except (OSError, ValueError, SyntaxError) as error:
            raise InvalidArgumentError(
                f"{self.source}: images[{key!r}].mask {name!r} cannot be read: {error}"
            ) from None
        if tuple(mask.shape) != (item.height, item.width):
            raise InvalidArgumentError(
                f"{self.source}: images[{key!r}].mask {name!r} is {mask.shape[1]}x{mask.shape[0]} pixels but its "
                f"image is {item.width}x{item.height}"
            )
        return mask

    def masks(self, items: Sequence[ImageItem], preprocess: Preprocess, size: tuple[int, int], targets: Tensor,
              references: Tensor, class_names: Sequence[str] | None) -> tuple[Tensor, Tensor]:
        regions = torch.zeros(len(items), *size, dtype=torch.bool)
        radius = DEFAULT_KEYPOINT_RADIUS * min(size) if self.radius is None else self.radius
        for i, item in enumerate(items):
            key, entry = self._entry(item.path)
            if key is None or entry is None:
                continue
            if self.kind == "box":
                boxes = torch.tensor(entry["boxes"], dtype=torch.float64).view(-1, 2, 2)
                corners = torch.stack([_transform_points(b, item, preprocess) for b in boxes]).view(1, -1, 4)
                regions[i] = boxes_to_masks(corners, None, size)[0]
            elif self.kind == "parts":
                points = _transform_points(torch.tensor(entry["keypoints"], dtype=torch.float64).view(-1, 2), item,
                                           preprocess)
                regions[i] = keypoints_to_masks(points[None], None, size, radius)[0]
            else:
                regions[i] = transform_mask(self._mask(entry["mask"], key, item), preprocess, size)
        return regions, regions.flatten(1).any(dim=1)


def cub_regions(root: Path, kind: str, keypoint_radius: float | None) -> BoxKeypointRegions:
    """The CUB-200-2011 bounding boxes or part keypoints; image paths are relative to ``root/images``, and an image
    outside it (a copy of the test split, say) is matched by ``<class folder>/<file name>``. Every line is checked
    (known image id, finite numbers, boxes of positive size) when read."""
    paths = read_cub_images(root)
    if kind == "box":
        table, field = root / "bounding_boxes.txt", "boxes"
        values = read_cub_boxes(root, paths)
    else:
        table, field = root / "parts" / "part_locs.txt", "keypoints"
        values = read_cub_keypoints(root, paths)
    entries: dict[str, dict] = {path: {field: values[path]} if path in values else {} for path in paths.values()}
    what = "bounding box" if kind == "box" else "visible part keypoints (disks)"
    return BoxKeypointRegions(root / "images", entries, kind, keypoint_radius, f"CUB-200-2011 {what}",
                              repr(str(table)), tail=2)


def check_coverage(regions: Regions, paths: Sequence[Path], annotations: str | Path) -> str:
    """Check that some of ``paths`` have a region before an evaluation starts; return a note saying how many are left
    out of the localization metrics ("" when none is).

    Raises:
        InvalidArgumentError: no image has a region (the paths are matched relative to ``regions.root``), or a
            region does not fit its image.
    """
    found = regions.annotated(paths)
    count = sum(found)
    if paths and count == 0:
        first = Path(paths[0])
        key = _relative(first, regions.root)
        where = (f"the first image is {key!r} relative to it" if key is not None
                 else f"the first image, {str(first)!r}, is not under it")
        if isinstance(regions, BoxKeypointRegions):
            named = [name for name, entry in regions.entries.items() if entry]
            where += f"; the file names {len(named)} images" + (f", e.g. {named[0]!r}" if named else "")
        raise InvalidArgumentError(
            f"0 of {len(paths)} images have annotations in {str(annotations)!r}; paths are matched relative to "
            f"{str(regions.root)!r} ({where}). Give the annotations of this --data, or leave pointing and energy "
            "out of --metrics"
        )
    if count < len(paths):
        return (f"{len(paths) - count} of {len(paths)} images have no annotation in {str(annotations)!r} and are left "
                f"out of pointing and energy (paths are matched relative to {str(regions.root)!r})")
    return ""


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
            "\"keypoints\": [[x, y]], \"mask\": \"mask.png\"}}} (see finercam.evaluation.annotations)"
        )
    if kind == "difference":
        raise InvalidArgumentError("difference regions come only from synthetic annotations")
    entries = {key: check_entry(path, key, entry) for key, entry in images.items()}
    present = [field for field in FIELDS if any(entry.get(field) for entry in entries.values())]
    kind = kind or next((k for k, field in _FIELD_OF.items() if field in present), "box")
    if present and _FIELD_OF[kind] not in present:
        choices = " or ".join(k for k, field in _FIELD_OF.items() if field in present)
        raise InvalidArgumentError(f"{str(path)!r} gives no image {_FIELD_OF[kind]!r} for --regions {kind}; it gives "
                                   f"{present}: choose --regions {choices}")
    return BoxKeypointRegions(path.parent, entries, kind, keypoint_radius, f"{kind} regions from {path.name}",
                              repr(str(path)))
