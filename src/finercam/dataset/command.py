"""The ``run``, ``visualize``, ``report`` and ``export`` commands: whole datasets into a result store, and views of it.

Registered by :func:`add_commands` on the ``finercam`` parser and run by :func:`dispatch`. ``--model`` takes the
model specs of ``finercam explain`` (``embedded:cnn`` and ``embedded:vit`` included).
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from finercam.argtypes import gamma as _gamma
from finercam.argtypes import non_negative_int as _non_negative_int
from finercam.argtypes import positive_int as _positive_int
from finercam.dataset.settings import (
    AMP_DTYPES,
    DEFAULT_BATCH_SIZE,
    DEFAULT_CHUNK_SIZE,
    REFERENCE_STRATEGIES,
    TARGETS,
    RunSettings,
    parse_shard,
    resolve_processes,
)
from finercam.errors import InvalidArgumentError
from finercam.explain import DEFAULT_GAMMA, DEFAULT_NUM_REFERENCES
from finercam.methods import METHODS

if TYPE_CHECKING:
    import torch

    from finercam.dataset.store_reader import ResultStore
    from finercam.models import LoadedModel

COMMANDS = ("run", "visualize", "report", "export")


def _say(line: str) -> None:
    print(line, flush=True)





def _shard(text: str) -> tuple[int, int]:
    try:
        return parse_shard(text)
    except InvalidArgumentError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _add_run(commands: argparse._SubParsersAction) -> None:
    run = commands.add_parser(
        "run", help="explain a whole dataset (ImageFolder tree or list file) into a resumable result store"
    )
    run.add_argument("--model", required=True, help="a model spec of 'finercam explain', or embedded:cnn|vit")
    run.add_argument("--weights", help="weights file: safetensors, or a state dict (loaded with weights_only=True)")
    run.add_argument("--head", help="a linear head (from train-probe, or an official Finer-CAM head file)")
    run.add_argument("--preprocess", help="preprocessing preset (default: the model's own configuration)")
    run.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when present)")
    run.add_argument("--data", required=True, help="ImageFolder root, or a list file ('path' or 'path<TAB>label')")
    run.add_argument("--out", required=True, help="the result store folder (an existing one with the same "
                     "settings is resumed)")
    run.add_argument("--class-names", help="the model's class names, one per line in class order")
    run.add_argument("--layer", help="target layer (default: the model's recommended layer, else auto)")
    run.add_argument("--method", default="gradcam", choices=sorted(METHODS))
    run.add_argument("--gammas", type=_gamma, nargs="+", default=[DEFAULT_GAMMA],
                     help="comparison strengths stored per image (default 0.6; the baseline is always stored; a "
                     "linear method re-renders any other gamma later)")
    run.add_argument("--references", default="nearest", choices=REFERENCE_STRATEGIES)
    run.add_argument("--num-references", type=_positive_int, default=DEFAULT_NUM_REFERENCES)
    run.add_argument("--aggregation", default="mean", choices=["mean", "softmax"])
    run.add_argument("--target", default="auto", choices=TARGETS,
                     help="class explained: label (ground truth), prediction, or auto (label when all have one)")
    run.add_argument("--batch-size", type=_positive_int, default=DEFAULT_BATCH_SIZE)
    run.add_argument("--chunk-size", type=_positive_int, default=DEFAULT_CHUNK_SIZE,
                     help="images per store file (fixed when the store is created)")
    run.add_argument("--processes", type=_positive_int,
                     help="CPU models: worker processes, each decoding and explaining whole batches with one torch "
                     "thread (default: one per core, at most 32, fewer if the memory is short; 1 on a GPU)")
    run.add_argument("--workers", type=_non_negative_int,
                     help="one-process runs (GPU, or --processes 1): decoding processes feeding the model (default: "
                     "all cores but one on CUDA; on the CPU (cores - 2) // 2)")
    run.add_argument("--amp", default="none", choices=["none", *AMP_DTYPES], help="autocast on CUDA")
    run.add_argument("--shard", type=_shard, default=(0, 1), metavar="I/N",
                     help="this machine's share: chunks k with k mod N == I (0 <= I < N)")
    run.add_argument("--max-pixels", type=_positive_int,
                     help="skip images with more pixels (default: Pillow's decompression-bomb limit)")
    run.add_argument("--score-batch-size", type=_positive_int, default=64, help="Score-CAM masked inputs per pass")
    run.add_argument("--threads", type=_non_negative_int, default=0,
                     help="torch CPU threads of a one-process run (default: torch's; worker processes use one each)")
    run.add_argument("--quiet", action="store_true", help="no progress line")


def _add_views(commands: argparse._SubParsersAction) -> None:
    visualize = commands.add_parser("visualize", help="comparison grids: image | reference exemplar | base | Finer")
    visualize.add_argument("store", nargs="+", help="result store folder(s) (shards of one run may be listed)")
    visualize.add_argument("--out", required=True, help="output folder")
    visualize.add_argument("--gamma", type=_gamma, help="comparison strength shown (default: the store's)")
    visualize.add_argument("--id", action="append", dest="ids", help="only this image id (repeatable)")
    visualize.add_argument("--limit", type=_positive_int, help="at most this many images")
    visualize.add_argument("--panel", type=_positive_int, default=224, help="panel size in pixels")
    report = commands.add_parser("report", help="a self-contained HTML gallery of a result store")
    report.add_argument("store", nargs="+", help="result store folder(s)")
    report.add_argument("--out", required=True, help="the HTML file")
    report.add_argument("--gamma", type=_gamma, help="comparison strength shown (default: the store's)")
    report.add_argument("--limit", type=_non_negative_int, default=500, help="at most this many images (0: all)")
    report.add_argument("--order", default="listing", choices=["listing", "margin"],
                        help="which images fill the limit: the first, or the smallest confidence margins")
    export = commands.add_parser("export", help="PNG overlays or the official Finer-CAM per-image .npy files")
    export.add_argument("store", nargs="+", help="result store folder(s)")
    export.add_argument("--out", required=True, help="output folder")
    export.add_argument("--format", default="png", choices=["png", "official"])
    export.add_argument("--gamma", type=_gamma, help="comparison strength (default: the store's)")
    export.add_argument("--limit", type=_positive_int, help="at most this many images")


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Register ``run``, ``visualize``, ``report`` and ``export`` on the ``finercam`` sub-command parser."""
    _add_run(commands)
    _add_views(commands)


def _load(args: argparse.Namespace) -> tuple[LoadedModel, torch.device]:
    from finercam.models import load_model
    from finercam.runtime import resolve_device

    device = resolve_device(args.device)
    loaded = load_model(args.model, weights=args.weights, head=args.head, preprocess=args.preprocess, device=device)
    return loaded, device


def run_run(args: argparse.Namespace) -> int:
    """``finercam run --model SPEC --data DIR|LIST --out DIR``."""
    from finercam.dataset.pipeline import run_dataset
    from finercam.dataset.sources import open_source, read_class_names
    from finercam.explain_image import last_linear
    from finercam.runtime import cpu_threads

    loaded, device = _load(args)
    names = read_class_names(args.class_names) if args.class_names else loaded.class_names
    source = open_source(args.data, names)
    settings = RunSettings(
        method=args.method, layer=args.layer or loaded.target_layer or "auto", gammas=tuple(args.gammas),
        references=args.references, num_references=args.num_references, aggregation=args.aggregation,
        target=args.target, batch_size=args.batch_size, chunk_size=args.chunk_size, num_workers=args.workers,
        processes=args.processes, amp=args.amp, shard=args.shard, max_pixels=args.max_pixels, progress=not args.quiet,
        score_batch_size=args.score_batch_size,
    )
    info = {"spec": args.model, "weights": args.weights, "head": args.head, "class_names_file": args.class_names}
    weights = last_linear(loaded.model) if args.references == "weights" else None
    settings.check()
    processes = resolve_processes(settings, device)
    layout = f"{processes} worker processes of 1 thread" if processes > 1 else "1 process"
    _say(
        f"run: {args.model} on {device} ({layout}); {len(source.items)} images ({source.kind} {source.location}); "
        f"{args.method}, gammas {list(args.gammas)}, {args.references} T={args.num_references}; store {args.out}"
    )
    with cpu_threads(args.threads):
        summary = run_dataset(
            loaded.model, loaded.preprocess, source, args.out, settings,
            model_info=info, classifier_weights=weights, log=_say,
        )
    for line in summary.lines():
        _say(line)
    return 0


def _store(args: argparse.Namespace) -> ResultStore:
    from finercam.dataset.store_reader import load_store

    return load_store(args.store if len(args.store) > 1 else args.store[0])


def run_visualize(args: argparse.Namespace) -> int:
    """``finercam visualize STORE --out DIR``."""
    from finercam.dataset.visualize import save_grids

    store = _store(args)
    written, skipped = save_grids(store, args.out, args.gamma, ids=args.ids, limit=args.limit, panel=args.panel)
    _say(f"wrote {len(written)} comparison grids to {args.out}")
    for image_id, reason in skipped[:10]:
        _say(f"  left out {image_id}: {reason}")
    return 0


def run_report(args: argparse.Namespace) -> int:
    """``finercam report STORE --out FILE.html``."""
    from finercam.dataset.gallery import write_gallery

    store = _store(args)
    path, left_out = write_gallery(store, args.out, args.gamma, limit=args.limit or None, order=args.order)
    _say(f"wrote {path} ({len(store)} images in the store; {len(left_out)} unreadable now)")
    return 0


def run_export(args: argparse.Namespace) -> int:
    """``finercam export STORE --out DIR --format png|official``."""
    from finercam.dataset.export import export_official, export_overlays

    store = _store(args)
    exporter = export_official if args.format == "official" else export_overlays
    report = exporter(store, args.out, args.gamma, limit=args.limit)
    _say(f"wrote {len(report.written)} {args.format} files to {args.out}")
    for image_id, reason in report.skipped[:10]:
        _say(f"  left out {image_id}: {reason}")
    return 0


def dispatch(args: argparse.Namespace) -> int:
    """Run the command named by ``args.command`` (one of :data:`COMMANDS`); returns the exit status."""
    return {"run": run_run, "visualize": run_visualize, "report": run_report, "export": run_export}[args.command](args)
