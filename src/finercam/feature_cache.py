"""A resumable on-disk cache of a frozen backbone's pooled features, one row per image file.

Rows are keyed by the image file (resolved path, size, modification time) inside a folder keyed by the backbone's
*content*: its spec, preprocessing, pooling, feature size, the SHA-256 of the files its spec names (a ``python:``
factory, a ``torchscript:`` file, an ``hf:DIR`` folder's configuration) and the bytes of every tensor of its state
dict. A changed
checkpoint, ``python:`` factory or ``hf:`` folder therefore never serves stale features, while another split of the
same images (``--val-fraction``, ``--seed``, an added or removed file) reuses every row already computed.

Rows are written in chunks of ``chunk_images`` as they are computed (each chunk atomically, ``.partial`` then
rename), and whatever was computed is written also when the extraction is interrupted (Ctrl-C, an unreadable image),
so a rerun only computes the rest.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from finercam.errors import InvalidArgumentError
from finercam.images import ImageFolder, load_image
from finercam.models import LoadedBackbone

Log = Callable[[str], None]
CHUNK_IMAGES = 256
"""Rows per chunk file: an interruption loses at most this many images' features."""
_KEYS = "keys"


def backbone_key(backbone: LoadedBackbone) -> str:
    """A digest of everything that decides a backbone's features: spec, preprocessing, pooling, size and weights."""
    from finercam.fingerprint import model_fingerprints

    digest = hashlib.sha256()  # the files the spec names too: a python: factory or hf config.json changes the code
    files = model_fingerprints(backbone.spec)
    digest.update(json.dumps([backbone.spec, repr(backbone.preprocess), backbone.pooling, backbone.dim, files],
                             sort_keys=True).encode())
    for name, tensor in backbone.features.state_dict().items():
        flat = tensor.detach().reshape(-1).contiguous().cpu()
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:20]


def image_key(path: Path) -> str:
    """A digest of one image file's resolved path, size and modification time."""
    stat = path.stat()
    return hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:24]


def _cached_rows(folder: Path, wanted: set[str], log: Log) -> dict[str, Tensor]:
    """The rows of ``wanted`` keys found in the chunks of ``folder``; unreadable chunks are skipped (recomputed)."""
    rows: dict[str, Tensor] = {}
    for chunk in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
        try:
            with safe_open(str(chunk), framework="pt") as handle:
                keys = (handle.metadata() or {}).get(_KEYS, "").split(",")
                hits = [(row, key) for row, key in enumerate(keys) if key in wanted and key not in rows]
                if hits:
                    features = handle.get_tensor("features")
                    rows.update((key, features[row]) for row, key in hits)
        except (SafetensorError, OSError, KeyError, IndexError) as error:
            log(f"  skipping an unreadable feature cache file {chunk.name} ({error}); its images are recomputed")
    return rows


def _write_chunk(folder: Path, keys: Sequence[str], features: Sequence[Tensor]) -> None:
    """One chunk file, named by its keys (writing the same rows twice gives the same file), written atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    name = hashlib.sha256(",".join(keys).encode()).hexdigest()[:20]
    partial = folder / f"{name}.{os.getpid()}-{secrets.token_hex(4)}.partial"  # two runs never share one
    save_file({"features": torch.stack(list(features)).contiguous()}, str(partial), metadata={_KEYS: ",".join(keys)})
    os.replace(partial, folder / f"{name}.safetensors")


def _batches(
    samples: Sequence[tuple[Path, str]], backbone: LoadedBackbone, batch_size: int
) -> Iterator[tuple[Tensor, list[str]]]:
    """Preprocessed images and their keys in batches; consecutive images of equal size are stacked (variable-size
    presets)."""
    pending: list[Tensor] = []
    keys: list[str] = []
    for path, key in samples:
        tensor = backbone.preprocess(load_image(path))
        if pending and (tensor.shape != pending[0].shape or len(pending) == batch_size):
            yield torch.stack(pending), keys
            pending, keys = [], []
        pending.append(tensor)
        keys.append(key)
    if pending:
        yield torch.stack(pending), keys


def extract_features(
    backbone: LoadedBackbone,
    folder: ImageFolder,
    cache_dir: Path,
    *,
    batch_size: int = 32,
    chunk_images: int = CHUNK_IMAGES,
    key: str | None = None,
    log: Log = print,
) -> tuple[Tensor, Tensor, bool]:
    """Pooled features ``(N, D)`` (float32, on the CPU) and labels ``(N,)`` of a split, computing only the images
    the cache lacks.

    Returns:
        features, labels, and whether every row came from the cache (an empty split, which needs nothing, counts as
        cached). ``key`` is :func:`backbone_key` when the caller has it (hashing a large model takes a while).

    Raises:
        InvalidArgumentError: ``batch_size`` or ``chunk_images`` is below 1.
    """
    for name, value in (("batch size", batch_size), ("chunk_images", chunk_images)):
        if value < 1:
            raise InvalidArgumentError(f"{name} must be at least 1; got {value}")
    labels = torch.tensor([label for _, label in folder.samples], dtype=torch.long)
    if not folder.samples:  # an empty split (e.g. no class with two images to hold one out): nothing to extract
        return torch.empty(0, backbone.dim), labels, True
    keys = [image_key(path) for path, _ in folder.samples]
    store = cache_dir / f"features-{key or backbone_key(backbone)}"
    rows = _cached_rows(store, set(keys), log)
    pairs = zip((path for path, _ in folder.samples), keys, strict=True)
    missing = list(dict.fromkeys((path, key) for path, key in pairs if key not in rows))
    if rows and missing:
        log(f"  features of {len(folder.samples) - len(missing)} of {len(folder.samples)} images from the cache")
    if missing:
        _compute(backbone, missing, rows, store, batch_size, chunk_images, log)
    return torch.stack([rows[key] for key in keys]), labels, not missing


def _compute(
    backbone: LoadedBackbone,
    missing: Sequence[tuple[Path, str]],
    rows: dict[str, Tensor],
    store: Path,
    batch_size: int,
    chunk_images: int,
    log: Log,
) -> None:
    """Features of ``missing`` into ``rows``, written to ``store`` every ``chunk_images`` and on the way out."""
    device = next(iter(backbone.features.parameters()), torch.empty(0)).device
    unsaved: list[str] = []
    done, start = 0, time.perf_counter()
    try:
        with torch.inference_mode():
            for images, batch_keys in _batches(missing, backbone, batch_size):
                features = backbone.features(images.to(device)).float().cpu()
                rows.update(zip(batch_keys, features, strict=True))
                unsaved += batch_keys
                if len(unsaved) >= chunk_images:
                    _write_chunk(store, unsaved, [rows[key] for key in unsaved])
                    unsaved = []
                done += len(batch_keys)
                log(f"  features {done}/{len(missing)} ({done / max(time.perf_counter() - start, 1e-9):.1f} images/s)")
    finally:  # also on Ctrl-C or an unreadable image: what was computed is kept for the rerun
        if unsaved:
            _write_chunk(store, unsaved, [rows[key] for key in unsaved])
