r"""What to explain: the images of an ImageFolder tree or of a list file, with their ground-truth classes.

* **ImageFolder tree** (``DIR/<class name>/.../<image>``): the class of an image is its top-level folder.
* **List file** (any text file): one image per line, ``path`` or ``path<TAB>label`` (a label without spaces may also
  follow the path after a space when the whole line is not an existing file); blank lines and lines starting with
  ``#`` are ignored; relative paths are resolved against the list file's folder. A label is a class name or a class
  index.
* **Class-names file** (``--class-names``): one class name per line, line ``i`` naming class ``i`` of the model.

Ground-truth names are matched to the model's class names (its own, or the class-names file's) exactly, or else
after normalising case, spaces, ``_`` and ``-`` when that gives a unique class; names that match no class stop the run
with an error that lists every one of them with its closest class names. There is never a fallback to the
prediction. Without any class names (e.g. a torchvision model with a new head), the classes of an ImageFolder tree
are numbered by sorted folder name, the ``torchvision.datasets.ImageFolder`` convention, and the run says so.

Every image gets a stable identifier (its path relative to the tree, or its path as written in the list), and the
listing order (sorted for trees, as written for lists) is the order of the result store.
"""

from __future__ import annotations

import difflib
import hashlib
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from finercam.errors import InvalidArgumentError
from finercam.images import IMAGE_SUFFIXES, image_folder

LABEL_SOURCES = ("class-names", "normalised-class-names", "folder-order", "indices", "none")
_SHOWN = 20
_LIST_FILE = "a list file (one path per line)"
_DATA = "an ImageFolder folder or a list file (one path per line)"


class ClassNameMismatchError(InvalidArgumentError):
    """Ground-truth class names of the data that match no class of the model."""


@dataclass(frozen=True)
class DataItem:
    """One image to explain.

    Attributes:
        id: stable identifier (relative path in a tree, path as written in a list file).
        path: the file.
        label: ground-truth class ``c*`` as a class index of the model, or ``None`` when unknown.
        label_name: the ground-truth name as found in the data (folder name or list label), or ``None``.
    """

    id: str
    path: Path
    label: int | None
    label_name: str | None = None


@dataclass(frozen=True)
class DataSource:
    """The listing of a dataset.

    Attributes:
        kind: ``"image-folder"`` or ``"list"``.
        location: the folder or list file.
        items: the images, in store order.
        class_names: the model's class names when known (model, class-names file, or sorted folder names).
        label_source: how labels were obtained, one of :data:`LABEL_SOURCES`.
        notes: what the user should know about the labels (e.g. "numbered by sorted folder name").
    """

    kind: str
    location: Path
    items: tuple[DataItem, ...]
    class_names: tuple[str, ...] | None
    label_source: str
    notes: tuple[str, ...] = ()

    @property
    def has_labels(self) -> bool:
        """Whether every image has a ground-truth class."""
        return bool(self.items) and all(item.label is not None for item in self.items)

    def fingerprint(self) -> str:
        """A SHA-256 of the identifiers and labels, in order: a store resumes only on the same listing."""
        digest = hashlib.sha256()
        for item in self.items:
            digest.update(f"{item.id}\t{item.label}\n".encode())
        return digest.hexdigest()


def _is_image(path: Path) -> bool:
    """Whether a file is an image: an image suffix, or a header Pillow recognises."""
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return True
    try:
        with Image.open(path):
            return True
    except Image.DecompressionBombError:
        return True
    except Exception:  # not an image (or unreadable: reading it as text says why)
        return False


def read_text_file(path: Path, what: str, expected: str) -> str:
    """The text of a UTF-8 file given by the user, or an error naming ``what`` and the ``expected`` content when it
    is a folder, missing, unreadable, an image or another binary file, or not UTF-8."""
    shown = str(path)
    if path.is_dir():
        raise InvalidArgumentError(f"{what} {shown!r} is a folder; give a file ({expected})")
    if not path.exists():
        raise InvalidArgumentError(f"{what} {shown!r} does not exist; give a file ({expected})")
    if not path.is_file():
        raise InvalidArgumentError(f"{what} {shown!r} is not a regular file (a device or a pipe); give a file "
                                   f"({expected})")
    if _is_image(path):
        raise InvalidArgumentError(f"{what} {shown!r} is an image, not {expected}")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise InvalidArgumentError(f"{what} {shown!r} cannot be read ({error.strerror or error})") from None
    if b"\0" in data:
        raise InvalidArgumentError(f"{what} {shown!r} is a binary file (it holds NUL bytes), not {expected}")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise InvalidArgumentError(
            f"{what} {shown!r} is not UTF-8 text (byte 0x{data[error.start]:02x} on line {line}); give {expected}, "
            "saved as UTF-8"
        ) from None


def read_class_names(path: str | Path) -> tuple[str, ...]:
    """Read a class-names file: one name per line (trailing whitespace stripped; blank lines are an error)."""
    path = Path(path)
    lines = read_text_file(path, "class-names file", "a text file with one class name per line").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    names = tuple(line.strip() for line in lines)
    blank = [number for number, name in enumerate(names, start=1) if not name]
    if not names or blank:
        raise InvalidArgumentError(
            f"class-names file {str(path)!r} must hold one non-empty class name per line"
            + (f"; lines {blank[:_SHOWN]} are blank" if blank else "; it is empty")
        )
    duplicates = sorted(name for name, count in Counter(names).items() if count > 1)
    if duplicates:
        raise InvalidArgumentError(f"class-names file {str(path)!r} repeats the names {duplicates[:_SHOWN]}")
    return names


def normalise_name(name: str) -> str:
    """Case-folded, with runs of spaces, ``_`` and ``-`` made one space: ``"Black_footed  Albatross"`` ->
    ``"black footed albatross"``."""
    return re.sub(r"[\s_\-]+", " ", name).strip().casefold()


def match_class_names(found: Sequence[str], known: Sequence[str], where: str) -> tuple[dict[str, int], bool]:
    """Map each name in ``found`` to its index in ``known``.

    Returns:
        The mapping, and whether some name needed the normalised match.

    Raises:
        ClassNameMismatchError: names that match no class (or several after normalising), each with close matches.
    """
    exact = {name: index for index, name in enumerate(known)}
    by_normal: dict[str, list[int]] = {}
    for index, name in enumerate(known):
        by_normal.setdefault(normalise_name(name), []).append(index)
    mapping, normalised, missing = {}, False, []
    for name in dict.fromkeys(found):
        if name in exact:
            mapping[name] = exact[name]
            continue
        candidates = by_normal.get(normalise_name(name), [])
        if len(candidates) == 1:
            mapping[name], normalised = candidates[0], True
        else:
            missing.append(name)
    if missing:
        lines = []
        for name in missing[:_SHOWN]:
            close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.5)
            lines.append(f"{name!r} (closest: {', '.join(repr(c) for c in close)})" if close else repr(name))
        more = f" and {len(missing) - _SHOWN} more" if len(missing) > _SHOWN else ""
        raise ClassNameMismatchError(
            f"{len(missing)} class name(s) of {where} match no class of the model ({len(known)} classes): "
            f"{'; '.join(lines)}{more}. Rename them, or give the model's class names in order with --class-names FILE"
        )
    return mapping, normalised


def folder_source(root: str | Path, class_names: Sequence[str] | None) -> DataSource:
    """List an ImageFolder tree; labels from the folder names matched to ``class_names`` (see module doc)."""
    tree = image_folder(Path(root).resolve())
    folder_names = tree.classes
    notes: list[str] = []
    used = set(label for _, label in tree.samples)
    empty = [name for index, name in enumerate(folder_names) if index not in used]
    if empty:
        notes.append(
            f"{len(empty)} folder(s) of {str(tree.root)!r} hold no image and are left out: "
            f"{', '.join(repr(name) for name in empty[:5])}{' ...' if len(empty) > 5 else ''}"
            + ("; they still take their place in the sorted folder order" if class_names is None else "")
        )
    if class_names is None:
        mapping = {name: index for index, name in enumerate(folder_names)}
        names: tuple[str, ...] = tuple(folder_names)
        label_source = "folder-order"
        notes.append(
            f"the model has no class names: classes numbered by sorted folder name (ImageFolder convention): "
            f"0 = {folder_names[0]!r} ... {len(folder_names) - 1} = {folder_names[-1]!r}; "
            "give --class-names FILE if the model was trained with another order"
        )
    else:
        names = tuple(class_names)
        with_images = [name for index, name in enumerate(folder_names) if index in used]
        mapping, normalised = match_class_names(with_images, names, f"the folders of {str(tree.root)!r}")
        label_source = "normalised-class-names" if normalised else "class-names"
        if normalised:
            notes.append("some folder names matched a class name only after normalising case, spaces, '_' and '-'")
    loose = [p for p in tree.root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    if loose:
        notes.append(
            f"{len(loose)} image file(s) at the top of the tree (e.g. {loose[0].name!r}) are in no class folder and "
            "are left out; move them into their class's folder, or list them in a file"
        )
    items = tuple(
        DataItem(path.relative_to(tree.root).as_posix(), path, mapping[folder_names[label]], folder_names[label])
        for path, label in tree.samples
    )
    return DataSource("image-folder", tree.root, items, names, label_source, tuple(notes))


def _split_line(line: str, base: Path) -> tuple[str, str | None]:
    if "\t" in line:
        path, _, label = line.partition("\t")
        return path.strip(), label.strip() or None
    if (base / line).exists() or " " not in line:
        return line, None
    path, _, label = line.rpartition(" ")
    return path.strip(), label.strip() or None


def _label_index(label: str, names: Sequence[str] | None, exact: dict[str, int]) -> int | None:
    if label in exact:
        return exact[label]
    if label.isdigit() and (names is None or int(label) < len(names)):
        return int(label)
    return None


def list_source(list_file: str | Path, class_names: Sequence[str] | None) -> DataSource:
    """Read a list file (see module doc); labels are class names of ``class_names`` or class indices."""
    text = read_text_file(Path(list_file), "list file", _LIST_FILE)
    list_file = Path(list_file).resolve()
    base = list_file.parent
    entries: list[tuple[str, str | None]] = []
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            entries.append(_split_line(line, base))
    if not entries:
        raise InvalidArgumentError(f"list file {str(list_file)!r} names no image (one path per line)")
    repeated = sorted(path for path, count in Counter(path for path, _ in entries).items() if count > 1)
    if repeated:
        raise InvalidArgumentError(f"list file {str(list_file)!r} names these images twice: {repeated[:_SHOWN]}")
    labels = [label for _, label in entries if label is not None]
    names = tuple(class_names) if class_names is not None else None
    exact = {name: index for index, name in enumerate(names or ())}
    unresolved = sorted({label for label in labels if _label_index(label, names, exact) is None})
    mapping: dict[str, int] = {}
    label_source = "none" if not labels else "indices" if names is None else "class-names"
    if unresolved:
        if names is None:
            raise InvalidArgumentError(
                f"list file {str(list_file)!r} labels images with class names {unresolved[:_SHOWN]} but the model "
                "has no class names: give them with --class-names FILE, or use class indices"
            )
        mapping, normalised = match_class_names(unresolved, names, f"the list file {str(list_file)!r}")
        label_source = "normalised-class-names" if normalised else label_source
    items = []
    for path, label in entries:
        index = None if label is None else mapping.get(label, _label_index(label, names, exact))
        items.append(DataItem(path, Path(path) if Path(path).is_absolute() else base / path, index, label))
    notes = () if len(labels) in (0, len(entries)) else (
        f"{len(entries) - len(labels)} of {len(entries)} images in the list have no label",
    )
    return DataSource("list", list_file, tuple(items), names, label_source, notes)


def check_data(data: str | Path) -> None:
    """Check ``--data`` before any work: a folder, or a readable UTF-8 list file (not an image, not binary)."""
    data = Path(data)
    if data.is_dir():
        return
    if not data.exists():
        raise InvalidArgumentError(f"--data {str(data)!r} does not exist; give {_DATA}")
    if data.is_file():
        read_text_file(data, "--data", _DATA)
        return
    raise InvalidArgumentError(f"--data {str(data)!r} is neither an ImageFolder folder nor a list file")


def open_source(data: str | Path, class_names: Sequence[str] | None = None) -> DataSource:
    """An ImageFolder tree (a folder) or a list file (a UTF-8 text file, one image path per line)."""
    data = Path(data)
    if data.is_dir():
        return folder_source(data, class_names)
    check_data(data)
    return list_source(data, class_names)
