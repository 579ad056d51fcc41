"""File names made from image identifiers and class names that come from the data: never outside the output folder.

Class names and paths are data, and data may hold ``/``, ``..``, ``\\``, NUL, markup or thousands of characters.
Every output file name is built from :func:`safe_component` (letters, digits, ``.``, ``_`` and ``-`` only; no leading
dot), made unique with a short hash of the original text, and checked with :func:`inside` before writing.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from finercam.errors import InvalidArgumentError

_UNSAFE = re.compile(r"[^\w.\-]+", re.UNICODE)


MAX_COMPONENT_BYTES = 100
"""A name part's longest UTF-8 form: two of them, a hash and a suffix stay under the 255 bytes file systems take."""


def safe_component(text: str, max_length: int = 64) -> str:
    """One path component: unsafe runs become ``_``, leading and trailing dots and ``_`` are dropped, never empty;
    at most ``max_length`` characters and :data:`MAX_COMPONENT_BYTES` bytes (80 Chinese characters are 240), a cut
    name ending in a hash of the whole text, so that two long names sharing a beginning stay apart."""
    whole = _UNSAFE.sub("_", text).strip("._")
    cleaned = whole[:max_length].strip("._")
    encoded = cleaned.encode("utf-8", "surrogatepass")
    if len(encoded) > MAX_COMPONENT_BYTES - 9:  # room for "-" and the hash
        cleaned = encoded[: MAX_COMPONENT_BYTES - 9].decode("utf-8", "ignore").strip("._")
    if cleaned != whole:
        cleaned = f"{cleaned}-{short_hash(text)}"
    return cleaned or "_"


def short_hash(text: str, length: int = 8) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:length]


def unique_stem(image_id: str) -> str:
    """A file stem for an image: its safe name and a hash of its full identifier (so two ids never collide)."""
    return f"{safe_component(Path(image_id).stem)}-{short_hash(image_id)}"


def inside(root: Path, *parts: str) -> Path:
    """``root / parts``, refusing any result outside ``root`` (defence in depth after :func:`safe_component`)."""
    base = root.resolve()
    path = base.joinpath(*parts).resolve()
    if path != base and base not in path.parents:
        raise InvalidArgumentError(f"refusing to write {str(path)!r}: outside the output folder {str(base)!r}")
    return path


def make_folder(folder: Path) -> Path:
    """Create an output folder (and its parents), or say which part of the path is a file."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocking = next((part for part in (folder, *folder.parents) if part.exists() and not part.is_dir()), folder)
        raise InvalidArgumentError(
            f"cannot write into {str(folder)!r}: {str(blocking)!r} is a file; give a folder path"
        ) from None
    return folder
