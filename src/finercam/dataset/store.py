r"""The result store of ``finercam run``: a folder of a few large files, written atomically, resumable, sharded.

Layout (see ``docs/store.md`` for the full reference)::

    OUT/store.json                        manifest: format, version, model (with the size and SHA-256 of its
                                          weights, head and model files), layer, method, gammas, references,
                                          preprocessing, class names, the listing's size and fingerprint, the
                                          resolved layer, C and T, versions
    OUT/chunks/chunk-000000.safetensors   chunk k: every image at listing positions [k S, (k + 1) S)
    OUT/summary.json                      the last run's summary (summary-shard-I-of-N.json when sharded)

A chunk is one `safetensors <https://huggingface.co/docs/safetensors>`_ file. Its tensors hold one row per image
that was explained (rows sorted by listing position); the images that were skipped have no row but a record:

==================  =========  ==================================================================================
``index``           int64 n    listing position of the row
``labels``          int64 n    ground-truth class ``c*`` (-1 unknown)
``targets``         int64 n    explained class ``c``
``references``      int64 n,T  reference classes ``d_t`` (-1 pads)
``logits``          f32 n,C    class scores ``y`` (probabilities are their softmax)
``input_sizes``     int32 n,2  model input ``(H, W)``
``image_sizes``     int32 n,2  decoded image ``(height, width)`` (after EXIF rotation)
``map_sizes``       int32 n,2  layer resolution ``(h, w)``
``baseline_raw``    f32        signed base-CAM maps (``\gamma = 0``) before the ReLU, each ``h w`` values, row-major,
                               concatenated in row order
``finer_raw``       f32        signed Finer-CAM maps before the ReLU, ``G`` maps of ``h w`` per row (the run's
                               ``gammas`` in order), concatenated
==================  =========  ==================================================================================

The safetensors metadata holds ``format`` (``finercam-store-chunk``), ``version``, ``chunk``, ``settings``
(:func:`settings_digest`), ``layers``, ``batch_size``, ``device``, ``amp`` and ``records``: a JSON list with one
``{"index", "id", "path", "status", "reason"}`` per listing position of the chunk (``status``: ``ok`` or ``skipped``).

**Atomicity.** Every file is written to a temporary name in the same folder, flushed, ``fsync``-ed and moved into
place with ``os.replace`` (then the folder is ``fsync``-ed), so a crash or ``kill -9`` leaves either the complete
file or none: never a corrupt one. Temporary files of an interrupted write are removed when the run resumes.

**Resuming** a run (the same command again) reads which chunks exist and explains only the others (a chunk file
that :func:`check_chunk` refuses, e.g. cut short or copied in from another store, is renamed ``<name>.damaged`` and
explained again); it refuses a store made with other settings or another listing. While a shard runs it holds
``OUT/.lock-shard-I-of-N`` (removed when it ends; a killed run's lock is released by the kernel), so the same shard
started twice is refused rather than doing the work twice. **Sharding** (``--shard I/N``) gives chunk ``k`` to shard
``k mod N``; shards may write into one shared folder or into separate folders that
:func:`finercam.dataset.store_reader.load_store` reads together. Chunks fix the batches, so interrupted, resumed
and sharded runs give bitwise the same store as one uninterrupted run. 100,000 images with the default
``S = 512`` make 196 chunk files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor

from finercam.errors import InvalidArgumentError
from finercam.fingerprint import FINGERPRINTS, HF_ROLE
from finercam.mappings import differences

STORE_FORMAT, CHUNK_FORMAT, STORE_VERSION = "finercam-store", "finercam-store-chunk", 1
MANIFEST, CHUNKS = "store.json", "chunks"
ROW_TENSORS = ("index", "labels", "targets", "references", "logits", "input_sizes", "image_sizes", "map_sizes")
MAP_TENSORS = ("baseline_raw", "finer_raw")
_CHUNK_NAME = re.compile(r"^chunk-(\d{6,})\.safetensors$")
_TEMP_NAME = re.compile(r"^\.tmp-(?:chunk-(\d{6,})|.*?)-")
# Settings a resumed or sharded run must share with the store; anything else (batch size, device, workers) may differ.
COMPARED = ("chunk_size", "config", "data", "class_names")
RESOLVED = "model_outputs"  # what the first batch resolved (layers, C, T): compared when both runs know it


class StoreError(InvalidArgumentError):
    """A result store is missing, corrupt, or was made with other settings than a run asks for."""


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that the file is either complete or absent, also after ``kill -9``."""
    temporary = path.parent / f".tmp-{path.stem}-{os.getpid()}-{secrets.token_hex(4)}{path.suffix}"
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. a platform without directory descriptors
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def write_json(path: Path, value: object) -> None:
    """Atomically write ``value`` as indented JSON."""
    atomic_write(path, (json.dumps(value, indent=1, sort_keys=False) + "\n").encode())


def chunk_range(chunk: int, chunk_size: int, total: int) -> range:
    """The listing positions of a chunk."""
    return range(chunk * chunk_size, min(total, (chunk + 1) * chunk_size))


def num_chunks(total: int, chunk_size: int) -> int:
    """How many chunks a listing of ``total`` images makes."""
    return math.ceil(total / chunk_size)


def settings_digest(manifest: Mapping[str, Any]) -> str:
    """A digest of what a resume compares (:data:`COMPARED`), written into every chunk's metadata as ``settings``.

    Two runs with equal settings (shards written into separate folders) give equal digests, so their chunks are
    interchangeable, as they are bitwise; a chunk copied in from a store of other settings or another listing is told
    apart by it.
    """
    payload = json.dumps({key: manifest.get(key) for key in COMPARED}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def chunk_path(root: Path, chunk: int) -> Path:
    return root / CHUNKS / f"chunk-{chunk:06d}.safetensors"


def chunk_files(root: Path) -> dict[int, Path]:
    """The complete chunk files of a store, by chunk number."""
    folder = root / CHUNKS
    if not folder.is_dir():
        return {}
    found = {}
    for entry in folder.iterdir():
        match = _CHUNK_NAME.match(entry.name)
        if match:
            found[int(match.group(1))] = entry
    return dict(sorted(found.items()))


def read_manifest(root: Path) -> dict[str, Any]:
    path = root / MANIFEST
    if not path.is_file():
        raise StoreError(
            f"{str(root)!r} is the store's manifest; give the store's folder, {str(root.parent)!r}"
            if root.name == MANIFEST and root.is_file() else
            f"{str(root)!r} is not a finercam result store: {MANIFEST} is missing (make one with finercam run)"
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise StoreError(f"cannot read {str(path)!r}: {error}") from None
    if manifest.get("format") != STORE_FORMAT or manifest.get("version") != STORE_VERSION:
        raise StoreError(f"{str(path)!r} is not a {STORE_FORMAT} version {STORE_VERSION} manifest")
    return manifest


def _fingerprints(manifest: Mapping[str, Any]) -> Mapping[str, Any] | None:
    model = (manifest.get("config") or {}).get("model") or {}
    return model.get(FINGERPRINTS) if isinstance(model, Mapping) else None


def _without_fingerprints(manifest: Mapping[str, Any]) -> dict[str, Any]:
    config = dict(manifest.get("config") or {})
    if isinstance(config.get("model"), Mapping):
        config["model"] = {key: value for key, value in config["model"].items() if key != FINGERPRINTS}
    return {**manifest, "config": config}


def _fingerprint_differences(stored: Mapping[str, Any] | None, asked: Mapping[str, Any] | None) -> list[str]:
    """One line per model file whose size or SHA-256 changed, or that one side has and the other not.

    A file only the run has is no difference when the store records no file of its kind (:func:`_unrecorded`): the
    store was made before such files were fingerprinted, and :func:`unverified_fingerprints` names it.
    """
    if stored is None or asked is None:  # a store made before fingerprints existed: nothing to compare
        return []
    lines = []
    for role in sorted((set(stored) | set(asked)) - _unrecorded(stored, asked)):
        before, now = stored.get(role), asked.get(role)
        if before == now:
            continue
        if before is None or now is None:
            lines.append(f"config.model.{FINGERPRINTS}.{role}: store {'no file' if before is None else 'a file'}, "
                         f"now {'no file' if now is None else 'a file'}")
            continue
        lines.append(
            f"config.model.{FINGERPRINTS}.{role}: the {role} file changed since the store was made (size "
            f"{before.get('size')} -> {now.get('size')} bytes, sha256 {str(before.get('sha256'))[:12]}... -> "
            f"{str(now.get('sha256'))[:12]}...)"
        )
    return lines


def compare_manifests(stored: Mapping[str, Any], asked: Mapping[str, Any]) -> list[str]:
    """The differences that stop a resume (or a merge of shards): one line each, ``key: store X, now Y``.

    The fingerprints of the model files are compared when both manifests record them (stores made before they
    existed have none, and stay readable and resumable).
    """
    keys = [*COMPARED, *([RESOLVED] if stored.get(RESOLVED) and asked.get(RESOLVED) else [])]
    files = _fingerprint_differences(_fingerprints(stored), _fingerprints(asked))
    stored, asked = _without_fingerprints(stored), _without_fingerprints(asked)
    return files + differences({key: stored.get(key) for key in keys}, {key: asked.get(key) for key in keys},
                               before="store")


def _kind(role: str) -> str:
    """``hf:config.json`` and ``hf:model.safetensors`` are of one kind, ``hf``; other roles are their own kind."""
    return role.split(":", 1)[0] if role.startswith(HF_ROLE) else role


def _unrecorded(stored: Mapping[str, Any], asked: Mapping[str, Any]) -> set[str]:
    """The run's files of a kind the store records none of (a store made before that kind was fingerprinted; a
    ``--weights`` or ``--head`` added to the command shows as a changed ``config.model`` path instead)."""
    kinds = {_kind(role) for role in stored}
    return {role for role in asked if role not in stored and _kind(role) not in kinds}


def unverified_fingerprints(stored: Mapping[str, Any], asked: Mapping[str, Any]) -> list[str]:
    """The model files a run cannot check against a store made before they were fingerprinted."""
    recorded, now = _fingerprints(stored), _fingerprints(asked) or {}
    return sorted(now if recorded is None else _unrecorded(recorded, now))


class StoreWriter:
    """Opens a store to create or resume it, and writes its chunks atomically.

    A new store's manifest is written by :meth:`commit`, once the run has checked that the model fits the data, so
    that a run stopped by a user error leaves nothing that a corrected run would refuse to resume. ``notes`` says
    what a resumed store could not check (model files of a store made before fingerprints were recorded).
    """

    def __init__(self, root: str | Path, manifest: Mapping[str, Any], shard: tuple[int, int] = (0, 1)) -> None:
        self.root = Path(root)
        self.shard = shard
        self.notes: list[str] = []
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(f"--out {str(self.root)!r} exists and is not a folder")
        manifest = json.loads(json.dumps(manifest))  # the JSON view: tuples as lists, as they are read back
        self.committed = (self.root / MANIFEST).exists()
        if self.committed:
            stored = read_manifest(self.root)
            changed = compare_manifests(stored, manifest)
            if changed:
                raise StoreError(
                    f"the store {str(self.root)!r} was made with other settings or another listing, so it cannot be "
                    f"resumed: {'; '.join(changed[:8])}. Use a new --out folder, or the store's settings"
                )
            self.manifest = stored
            unchecked = unverified_fingerprints(stored, manifest)
            if unchecked:
                self.notes.append(
                    f"the store predates model-file fingerprints: it cannot be checked that the {', '.join(unchecked)} "
                    "file(s) are the ones it was made with; resume only with unchanged files"
                )
            self._remove_stale_temporaries()
            self._set_aside_damaged_chunks()
        else:
            self.manifest = manifest

    def commit(self, outputs: Mapping[str, Any] | None = None) -> None:
        """Record what the model resolved (layers, ``C``, ``T``) and write the manifest if it is new or lacked them.

        Raises:
            StoreError: the store was made with a model that resolved something else.
        """
        stored = self.manifest.get(RESOLVED)
        if outputs is not None and stored is not None and stored != outputs:
            raise StoreError(
                f"the store {str(self.root)!r} was made with a model that resolved {stored}; this one resolves "
                f"{dict(outputs)}: another model cannot resume it"
            )
        changed = outputs is not None and stored is None
        if changed:
            self.manifest = {**self.manifest, RESOLVED: dict(outputs)}  # type: ignore[arg-type]
        if changed or not self.committed:
            (self.root / CHUNKS).mkdir(parents=True, exist_ok=True)
            write_json(self.root / MANIFEST, self.manifest)
            self.committed = True

    def _remove_stale_temporaries(self) -> None:
        """Remove temporary files of interrupted writes of this shard's chunks (other shards may be writing)."""
        index, count = self.shard
        if not (self.root / CHUNKS).is_dir():
            return
        for entry in (self.root / CHUNKS).iterdir():
            match = _TEMP_NAME.match(entry.name)
            if match and match.group(1) is not None and int(match.group(1)) % count == index:
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()

    def _set_aside_damaged_chunks(self) -> None:
        """Rename this shard's chunk files that :func:`check_chunk` refuses (a header that cannot be read, e.g. cut
        short by a partial copy; a chunk of another store or of another position copied in) to ``<name>.damaged``,
        so that resuming explains those chunks again; kept, not deleted, and said in :attr:`notes`."""
        index, count = self.shard
        for chunk, path in chunk_files(self.root).items():
            if chunk % count != index:
                continue
            try:
                check_chunk(path, chunk, self.manifest)
            except StoreError as error:
                aside = path.with_name(f"{path.name}.damaged")
                number = 1
                while aside.exists():
                    number += 1
                    aside = path.with_name(f"{path.name}.damaged-{number}")
                os.replace(path, aside)
                self.notes.append(f"{error}; it is explained again (the damaged file is kept as {aside.name!r})")

    def completed(self) -> set[int]:
        return set(chunk_files(self.root))

    def write_chunk(self, chunk: int, tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> Path:
        """Serialise one chunk and move it into place atomically (after :meth:`commit`)."""
        if not self.committed:
            raise StoreError("commit() the manifest before writing chunks")
        data = save_safetensors(
            {name: tensor.contiguous() for name, tensor in tensors.items()},
            metadata={"format": CHUNK_FORMAT, "version": str(STORE_VERSION), "chunk": str(chunk),
                      "settings": settings_digest(self.manifest), **metadata},
        )
        path = chunk_path(self.root, chunk)
        atomic_write(path, data)
        return path


def read_chunk_metadata(path: Path) -> dict[str, str]:
    """The metadata of a chunk file, without reading its tensors."""
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as error:
        raise StoreError(f"chunk {str(path)!r} is unreadable ({type(error).__name__}: {error})") from None
    if metadata.get("format") != CHUNK_FORMAT:
        raise StoreError(f"{str(path)!r} is not a {CHUNK_FORMAT} file")
    return metadata


def read_chunk(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """All tensors and the metadata of one chunk file."""
    metadata = read_chunk_metadata(path)
    try:
        tensors = load_safetensors(path.read_bytes())
    except Exception as error:
        raise StoreError(f"chunk {str(path)!r} is corrupt ({type(error).__name__}: {error})") from None
    missing = [name for name in (*ROW_TENSORS, *MAP_TENSORS) if name not in tensors]
    if missing:
        raise StoreError(f"chunk {str(path)!r} lacks the tensors {missing}")
    return tensors, metadata


def check_chunk(path: Path, chunk: int, manifest: Mapping[str, Any]) -> dict[str, str]:
    """Check that the file ``path`` is chunk ``chunk`` of the store whose manifest is ``manifest``; its metadata.

    Reads the header and two small tensors (``index``, ``map_sizes``), not the maps. Checked: the chunk number and
    settings digest in its metadata (chunks written before the digest existed have none), that its records are the
    chunk's listing positions in order, that its rows are its explained records, that every row tensor has one row per
    image and the widths ``C`` and ``T`` the model resolved, and that the maps are as long as ``map_sizes`` and the
    run's ``G`` gammas make them.

    Raises:
        StoreError: naming the file and the first thing that does not fit.
    """
    metadata = read_chunk_metadata(path)
    problem = _metadata_problem(metadata, chunk, manifest)
    if problem is None:
        try:
            with safe_open(path, framework="pt") as handle:
                present = set(handle.keys())
                missing = [name for name in (*ROW_TENSORS, *MAP_TENSORS) if name not in present]
                if missing:
                    raise StoreError(f"chunk {str(path)!r} lacks the tensors {missing}")
                shapes = {name: tuple(handle.get_slice(name).get_shape()) for name in (*ROW_TENSORS, *MAP_TENSORS)}
                index, map_sizes = handle.get_tensor("index"), handle.get_tensor("map_sizes")
        except StoreError:
            raise
        except Exception as error:
            raise StoreError(f"chunk {str(path)!r} is corrupt ({type(error).__name__}: {error})") from None
        problem = _tensor_problem(metadata, shapes, index, map_sizes, manifest)
    if problem is not None:
        raise StoreError(f"chunk {str(path)!r} is not chunk {chunk} of this store: {problem}")
    return metadata


def _metadata_problem(metadata: Mapping[str, str], chunk: int, manifest: Mapping[str, Any]) -> str | None:
    if metadata.get("chunk") != str(chunk):
        return f"its metadata says it is chunk {metadata.get('chunk')} (renamed or copied from elsewhere?)"
    if "settings" in metadata and metadata["settings"] != settings_digest(manifest):
        return "it was written by a run with other settings or another listing (copied in from another store?)"
    try:
        records = json.loads(metadata["records"])
        positions = [int(entry["index"]) for entry in records]
    except (KeyError, TypeError, ValueError):
        return "its records are missing or unreadable"
    expected = list(chunk_range(chunk, int(manifest["chunk_size"]), int(manifest["data"]["count"])))
    if positions != expected:
        shown = f"{positions[0]}-{positions[-1]}" if positions else "none"
        return (f"its records are listing positions {shown} ({len(positions)} images), the chunk's are "
                f"{expected[0] if expected else 0}-{expected[-1] if expected else -1} ({len(expected)} images)")
    return None


def _tensor_problem(
    metadata: Mapping[str, str], shapes: Mapping[str, tuple[int, ...]], index: Tensor, map_sizes: Tensor,
    manifest: Mapping[str, Any],
) -> str | None:
    explained = [int(entry["index"]) for entry in json.loads(metadata["records"]) if entry.get("status") == "ok"]
    if index.tolist() != explained:
        return f"its {len(index)} rows are not its {len(explained)} explained records"
    rows = len(explained)
    outputs = manifest.get(RESOLVED) or {}
    widths = {"logits": outputs.get("num_classes"), "references": outputs.get("num_references"),
              "input_sizes": 2, "image_sizes": 2, "map_sizes": 2}
    for name in ROW_TENSORS:
        shape, width = shapes[name], widths.get(name)
        wanted = (rows,) if name in ("index", "labels", "targets") else (rows, width)
        if len(shape) != len(wanted) or shape[0] != rows or (width is not None and shape[1] != width):
            described = "x".join("?" if size is None else str(size) for size in wanted)
            return f"its {name!r} tensor is {list(shape)}, the chunk's {rows} images need {described}"
    if rows and bool((map_sizes <= 0).any()):
        return "its map_sizes are not all positive"
    area = int((map_sizes[:, 0].long() * map_sizes[:, 1].long()).sum()) if rows else 0
    gammas = len((manifest.get("config") or {}).get("gammas") or ())
    for name, length in (("baseline_raw", area), ("finer_raw", gammas * area)):
        if shapes[name] != (length,):
            return f"its {name!r} holds {list(shapes[name])} values, its map_sizes and {gammas} gammas need {length}"
    return None
