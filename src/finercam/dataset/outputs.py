"""What an output folder of ``visualize`` or ``export`` holds, so that two views never share one.

The file names of a view are the images' (``<class>/<id>-<hash>.png``, ``<class>_<stem>.npy``), not its settings,
so a second view into the same folder at another gamma, of another store or in another format would overwrite the
first one's files, or leave a mixture of both. :func:`claim_folder` records the view's settings in
``OUT/finercam-view.json`` and refuses a folder whose record differs, naming the differences; the same view again
(a store grown by a resumed run or by its other shards, another ``--limit`` or ``--id``) writes into it; a folder
holding images without a record (an earlier finercam's view, or anything else) is refused. A store is its folder
and the time its run made it (``created`` in ``store.json``), so a new run written to the same path is another
store.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from finercam.dataset.names import make_folder
from finercam.dataset.store import read_manifest
from finercam.dataset.store_reader import ResultStore
from finercam.errors import InvalidArgumentError
from finercam.mappings import differences

RECORD = "finercam-view.json"
VIEW_SUFFIXES = (".png", ".npy")
"""What views write: a folder holding such files and no record is not claimed."""


def _stores(store: ResultStore) -> list[str]:
    """Each store folder with the time its run made it: a new run written to the same path is another store."""
    made = []
    for root in store.roots:
        created = read_manifest(root).get("created", "unknown")
        made.append(f"{root.resolve()} (made {created})")
    return sorted(made)


def claim_folder(out: str | Path, view: str, store: ResultStore, settings: Mapping[str, Any]) -> Path:
    """Create ``out`` for ``view`` (e.g. ``"png overlays"``) of ``store`` with ``settings`` (gamma, format, ...), and
    record them there.

    Raises:
        InvalidArgumentError: ``out`` holds another view (another store, gamma, format or setting), or a path part
            is a file.
    """
    root = make_folder(Path(out))
    record = json.loads(json.dumps({"view": view, "stores": _stores(store), **settings}))
    path = root / RECORD
    if path.is_file():
        held = _held(path)
        grown = set(held.get("stores") or ()) <= set(record["stores"])  # e.g. the other shards of the run added
        if not (grown and _settings(held) == _settings(record)):
            if held.get("view") != record["view"]:
                what = f"{held.get('view')}, not {view}"
            else:
                what = f"{view} made with other settings ({'; '.join(differences(held, record)[:6])})"
            raise InvalidArgumentError(
                f"{str(out)!r} holds {what}: its files would be overwritten by these or mixed with them; give another "
                "--out, or delete that folder first"
            )
        if held == record:
            return root
    elif any(found.suffix in VIEW_SUFFIXES for found in root.rglob("*")):
        raise InvalidArgumentError(
            f"{str(out)!r} already holds images or .npy files but no {RECORD} (a view made by an earlier finercam, "
            "or other files): these would overwrite them or mix with them; give another --out, or delete that "
            "folder first"
        )
    partial = root / f"{RECORD}.{os.getpid()}.partial"
    partial.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    os.replace(partial, path)
    return root


def _settings(record: Mapping[str, Any]) -> dict[str, Any]:
    """A record without its stores: the view and its settings."""
    return {key: value for key, value in record.items() if key != "stores"}


def _held(path: Path) -> dict[str, Any]:
    """The record a folder holds (a damaged one reads as a view of its own, which nothing matches)."""
    try:
        held = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return {"view": f"something unreadable ({RECORD} is not JSON)"}
    return held if isinstance(held, dict) else {"view": f"something else ({RECORD} is not a view record)"}
