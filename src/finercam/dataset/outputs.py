"""What an output folder of ``visualize`` or ``export`` holds, so that two views never share one.

The file names of a view are the images' (``<class>/<id>-<hash>.png``, ``<class>_<stem>.npy``), not its settings,
so a second view into the same folder at another gamma, of another store or in another format would overwrite the
first one's files, or leave a mixture of both. :func:`claim_folder` records the view's settings in
``OUT/finercam-view.json`` and refuses a folder whose record differs, naming the differences; the same view again
(a store grown by a resumed run, another ``--limit`` or ``--id``) writes into it. A store is its folder and the time
its run made it (``created`` in ``store.json``), so a new run written to the same path is another store.
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
        try:
            held = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            held = {"view": f"something unreadable ({RECORD} is not JSON)"}
        if not isinstance(held, dict):
            held = {"view": f"something else ({RECORD} is not a view record)"}
        if held != record:
            if held.get("view") != record["view"]:
                what = f"{held.get('view')}, not {view}"
            else:
                what = f"{view} made with other settings ({'; '.join(differences(held, record)[:6])})"
            raise InvalidArgumentError(
                f"{str(out)!r} holds {what}: its files would be overwritten by these or mixed with them; give another "
                "--out, or delete that folder first"
            )
        return root
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    os.replace(partial, path)
    return root
