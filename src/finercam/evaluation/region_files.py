"""Reading and checking region annotations (JSON regions files and CUB-200-2011 tables) before an evaluation runs.

Every bad entry is refused with an error naming the file, the image and the field, so that a typo never turns into
images silently scored as misses, or into a traceback half-way through a long run:

* :func:`check_entry`: one image's entry of a JSON regions file (``boxes``, ``keypoints``, ``mask``);
* :func:`read_cub_boxes`, :func:`read_cub_keypoints`: the CUB tables, checked line by line;
* :func:`check_fits`: boxes and keypoints against the size of their image (a box wholly outside it is refused; one
  partly outside is clipped when rasterised), a mask's size against the image's.
"""

from __future__ import annotations

import math
import numbers
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from finercam.errors import InvalidArgumentError

FIELDS = ("boxes", "keypoints", "mask")
_ROTATED = (5, 6, 7, 8)  # EXIF orientations that swap width and height (load_image applies them)
_EXAMPLE = '{"boxes": [[x0, y0, x1, y1], ...], "keypoints": [[x, y], ...], "mask": "mask.png"}'


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))


def _numbers(value: object, count: int) -> list[float] | None:
    """``value`` as ``count`` finite numbers, or ``None`` when it is anything else."""
    if not isinstance(value, list | tuple) or len(value) != count or not all(_is_number(v) for v in value):
        return None
    return [float(v) for v in value]


def _check_boxes(where: str, value: object) -> list[list[float]]:
    rule = "[x0, y0, x1, y1]: 4 finite numbers with x0 < x1 and y0 < y1, pixels of the original image"
    if not isinstance(value, list):
        raise InvalidArgumentError(f"{where}.boxes must be a list of boxes {rule}; got {value!r}")
    boxes = []
    for i, box in enumerate(value):
        corners = _numbers(box, 4)
        if corners is None:
            raise InvalidArgumentError(f"{where}.boxes[{i}] must be {rule}; got {box!r}")
        if not (corners[0] < corners[2] and corners[1] < corners[3]):
            raise InvalidArgumentError(f"{where}.boxes[{i}] is empty or inverted: {box!r}; a box is {rule}")
        boxes.append(corners)
    return boxes


def _check_keypoints(where: str, value: object) -> list[list[float]]:
    rule = "[x, y]: 2 finite numbers, pixels of the original image"
    if not isinstance(value, list):
        raise InvalidArgumentError(f"{where}.keypoints must be a list of keypoints {rule}; got {value!r}")
    points = []
    for i, point in enumerate(value):
        xy = _numbers(point, 2)
        if xy is None:
            raise InvalidArgumentError(f"{where}.keypoints[{i}] must be {rule}; got {point!r}")
        points.append(xy)
    return points


def _check_mask(where: str, value: object, folder: Path) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidArgumentError(f"{where}.mask must be the file name of a mask image relative to {str(folder)!r}; "
                                   f"got {value!r}")
    path = folder / value
    if not path.is_file():
        raise InvalidArgumentError(f"{where}.mask: the mask image {str(path)!r} does not exist")
    try:
        with Image.open(path):
            pass
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise InvalidArgumentError(f"{where}.mask: {str(path)!r} is not an image Pillow can read ({error})") from None
    return value


def check_entry(source: Path, key: str, entry: object) -> dict[str, Any]:
    """One image's entry of a JSON regions file, checked: boxes as ``[x0, y0, x1, y1]`` lists with ``x0 < x1`` and
    ``y0 < y1``, keypoints as ``[x, y]``, all finite numbers; a mask an existing image file relative to the file's
    folder. Raises :class:`InvalidArgumentError` naming ``source``, ``key`` and the bad field."""
    where = f"{str(source)!r}: images[{key!r}]"
    if not isinstance(entry, dict):
        raise InvalidArgumentError(f"{where} must be an object {_EXAMPLE}; got a {type(entry).__name__}: {entry!r}")
    unknown = sorted(set(entry) - set(FIELDS))
    if unknown:
        raise InvalidArgumentError(f"{where} has unknown fields {unknown}; the fields are {list(FIELDS)}")
    checked: dict[str, Any] = {}
    if "boxes" in entry:
        checked["boxes"] = _check_boxes(where, entry["boxes"])
    if "keypoints" in entry:
        checked["keypoints"] = _check_keypoints(where, entry["keypoints"])
    if "mask" in entry:
        checked["mask"] = _check_mask(where, entry["mask"], source.parent)
    return checked


def _read_table(path: Path, columns: int) -> list[tuple[int, list[str]]]:
    """The lines of a CUB table with their line numbers, each of at least ``columns`` fields."""
    if not path.is_file():
        raise InvalidArgumentError(f"the CUB annotations need {str(path)!r}, which does not exist")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) < columns:
            raise InvalidArgumentError(f"{str(path)!r} line {number}: expected {columns} fields, got {line!r}")
        rows.append((number, fields))
    return rows


def _cub_number(path: Path, number: int, name: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise InvalidArgumentError(f"{str(path)!r} line {number}: {name} {text!r} is not a finite number")
    return value


def _cub_image(path: Path, number: int, image_id: str, paths: dict[str, str]) -> str:
    if image_id not in paths:
        raise InvalidArgumentError(f"{str(path)!r} line {number}: image id {image_id!r} is not in images.txt")
    return paths[image_id]


def read_cub_images(root: Path) -> dict[str, str]:
    """``images.txt``: image id -> path relative to ``root/images``."""
    return {fields[0]: fields[1] for _, fields in _read_table(root / "images.txt", 2)}


def read_cub_boxes(root: Path, paths: dict[str, str]) -> dict[str, list[list[float]]]:
    """``bounding_boxes.txt`` (``id x y width height``) as ``[x0, y0, x1, y1]`` boxes per image path."""
    table = root / "bounding_boxes.txt"
    boxes: dict[str, list[list[float]]] = {}
    for number, (image_id, *fields) in _read_table(table, 5):
        image = _cub_image(table, number, image_id, paths)
        x, y, w, h = (_cub_number(table, number, name, text) for name, text in zip("xywh", fields, strict=False))
        if w <= 0 or h <= 0:
            raise InvalidArgumentError(f"{str(table)!r} line {number}: the box of image id {image_id} has width {w} "
                                       f"and height {h}; both must be > 0")
        boxes.setdefault(image, []).append([x, y, x + w, y + h])
    return boxes


def read_cub_keypoints(root: Path, paths: dict[str, str]) -> dict[str, list[list[float]]]:
    """``parts/part_locs.txt`` (``id part x y visible``): the visible keypoints per image path."""
    table = root / "parts" / "part_locs.txt"
    points: dict[str, list[list[float]]] = {}
    for number, (image_id, _part, *fields) in _read_table(table, 5):
        image = _cub_image(table, number, image_id, paths)
        x, y, visible = (_cub_number(table, number, name, text)
                         for name, text in zip(("x", "y", "visible"), fields, strict=False))
        if visible > 0:
            points.setdefault(image, []).append([x, y])
    return points


def image_size(path: Path) -> tuple[int, int] | None:
    """``(width, height)`` of an image as :func:`finercam.images.load_image` gives it (EXIF rotation applied), from
    its header alone; ``None`` when the file cannot be read (the evaluation then skips it and says why)."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            rotated = image.getexif().get(0x0112) in _ROTATED
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return None
    return (height, width) if rotated else (width, height)


def check_fits(source: str, key: str, entry: dict[str, Any], kind: str, size: tuple[int, int],
               folder: Path) -> None:
    """Refuse a box wholly outside its ``size = (width, height)`` image, a keypoint outside it, or a mask of another
    size: each would be scored as a miss on every image, which says nothing about the map."""
    width, height = size
    where = f"{source}: images[{key!r}]"
    if kind == "box":
        for i, (x0, y0, x1, y1) in enumerate(entry.get("boxes", [])):
            if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
                raise InvalidArgumentError(f"{where}.boxes[{i}] = {[x0, y0, x1, y1]} lies wholly outside the image, "
                                           f"which is {width}x{height} pixels")
    elif kind == "parts":
        for i, (x, y) in enumerate(entry.get("keypoints", [])):
            if not (0 <= x <= width and 0 <= y <= height):
                raise InvalidArgumentError(f"{where}.keypoints[{i}] = {[x, y]} lies outside the image, which is "
                                           f"{width}x{height} pixels")
    elif kind == "mask" and entry.get("mask"):
        with Image.open(folder / entry["mask"]) as mask:
            if mask.size != (width, height):
                raise InvalidArgumentError(f"{where}.mask {entry['mask']!r} is {mask.width}x{mask.height} pixels but "
                                           f"its image is {width}x{height}")
