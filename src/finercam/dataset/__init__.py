"""Finer-CAM over whole datasets: ``finercam run`` (batched, resumable, sharded) into a compact result store, then
re-rendering at any gamma, PNG and official ``.npy`` exports, comparison grids and an HTML gallery.

>>> from finercam.dataset import open_source, run_dataset, load_store     # doctest: +SKIP
>>> summary = run_dataset(model, preprocess, open_source("birds/test"), "cams")   # doctest: +SKIP
>>> store = load_store("cams"); store.finer_raw_maps(0).shape               # doctest: +SKIP
torch.Size([1, 16, 16])

Modules, lower first: ``sources`` (listings and labels), ``decode`` (one file, or why not), ``loading`` (chunks,
batches, the DataLoader), ``store`` (the on-disk format), ``progress``, ``pipeline`` (``run_dataset``), ``render``
(maps at any gamma), ``names`` (safe file names), ``export``, ``visualize``, ``gallery`` and ``command`` (the CLI).
"""

from finercam.dataset.pipeline import run_dataset
from finercam.dataset.progress import RunSummary
from finercam.dataset.render import finer_raw_map, render_baseline, render_map
from finercam.dataset.settings import RunSettings, parse_shard
from finercam.dataset.sources import ClassNameMismatchError, DataItem, DataSource, open_source, read_class_names
from finercam.dataset.store import StoreError
from finercam.dataset.store_reader import ImageRecord, ResultStore, load_store

__all__ = [
    "ClassNameMismatchError",
    "DataItem",
    "DataSource",
    "ImageRecord",
    "ResultStore",
    "RunSettings",
    "RunSummary",
    "StoreError",
    "finer_raw_map",
    "load_store",
    "open_source",
    "parse_shard",
    "read_class_names",
    "render_baseline",
    "render_map",
    "run_dataset",
]
