"""The ``run``, ``visualize``, ``report`` and ``export`` commands: whole datasets into a result store, and views of it.

Registered by :func:`add_commands` on the ``finercam`` parser and run by :func:`dispatch`. ``--model`` takes the
model specs of ``finercam explain`` (``embedded:cnn`` and ``embedded:vit`` included).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import TYPE_CHECKING

from finercam.argtypes import gamma as _gamma
from finercam.argtypes import non_negative_int as _non_negative_int
from finercam.argtypes import output_dir as _output_dir
from finercam.argtypes import output_file as _output_file
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


def _panel(text: str) -> int:
    """A panel side in pixels within :data:`finercam.dataset.visualize.PANEL_RANGE`."""
    from finercam.dataset.visualize import check_panel

    try:
        return check_panel(int(text))
    except (ValueError, InvalidArgumentError):
        from finercam.dataset.visualize import PANEL_RANGE

        raise argparse.ArgumentTypeError(
            f"must be a whole number of pixels from {PANEL_RANGE[0]} to {PANEL_RANGE[1]}, got {text}"
        ) from None


def _add_run(commands: argparse._SubParsersAction) -> None:
    from finercam.argtypes import PREPROCESS_HELP

    run = commands.add_parser(
        "run", help="explain a whole dataset (ImageFolder tree or list file) into a resumable result store"
    )
    run.add_argument("--model", required=True, help="a model spec of 'finercam explain', or embedded:cnn|vit")
    run.add_argument("--weights", help="weights file: safetensors, or a state dict (loaded with weights_only=True)")
    run.add_argument("--head", help="a linear head (from train-probe, or an official Finer-CAM head file)")
    run.add_argument("--preprocess", help=PREPROCESS_HELP)
    run.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when present)")
    run.add_argument("--data", required=True, help="ImageFolder root, or a list file ('path' or 'path<TAB>label')")
    run.add_argument("--out", required=True, type=_output_dir, help="the result store folder (an existing one "
                     "with the same settings is resumed; not inside --data)")
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
    visualize.add_argument("--out", required=True, type=_output_dir, help="output folder")
    visualize.add_argument("--gamma", type=_gamma, help="comparison strength shown (default: the store's)")
    visualize.add_argument("--id", action="append", dest="ids", help="only this image id (repeatable)")
    visualize.add_argument("--limit", type=_positive_int, help="at most this many images")
    visualize.add_argument("--panel", type=_panel, default=224, help="panel size in pixels (16 to 4096)")
    report = commands.add_parser("report", help="a self-contained HTML gallery of a result store")
    report.add_argument("store", nargs="+", help="result store folder(s)")
    report.add_argument("--out", required=True, type=_output_file(".html", ".htm"), help="the HTML file")
    report.add_argument("--gamma", type=_gamma, help="comparison strength shown (default: the store's)")
    report.add_argument("--limit", type=_non_negative_int, default=500, help="at most this many images (0: all)")
    report.add_argument("--order", default="listing", choices=["listing", "margin"],
                        help="which images fill the limit: the first, or the smallest confidence margins")
    export = commands.add_parser("export", help="PNG overlays or the official Finer-CAM per-image .npy files")
    export.add_argument("store", nargs="+", help="result store folder(s)")
    export.add_argument("--out", required=True, type=_output_dir, help="output folder")
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


def _classifier(loaded: LoadedModel, args: argparse.Namespace) -> torch.nn.Linear | None:
    """The linear classifier of ``--references weights`` (``None`` for other strategies), or an error before the run
    when the model has none."""
    from finercam.explain_image import last_linear

    if args.references != "weights":
        return None
    weights = last_linear(loaded.model)
    if weights is None:
        raise InvalidArgumentError(
            f"--references weights needs a model whose last layer is a linear classifier (torch.nn.Linear), whose "
            f"weight rows give the class similarities; {args.model} has none (a TorchScript or wrapped model hides "
            "it). Use --references nearest or --references top"
        )
    return weights


def _check_order(path: str, given: Sequence[str], own: Sequence[str]) -> None:
    """A class-names file that names one of the model's own classes at another position would relabel every image
    of it silently: refused."""
    position = {name.casefold(): i for i, name in enumerate(own)}
    for i, name in enumerate(given):
        j = position.get(name.casefold())
        if j is not None and j != i:
            raise InvalidArgumentError(
                f"--class-names {path!r} puts the model's class {own[j]!r} at position {i}, but the model has it at "
                f"{j}: the names must follow the model's class order (the model knows its names, so --class-names "
                "can be left out)"
            )


def run_run(args: argparse.Namespace) -> int:
    """``finercam run --model SPEC --data DIR|LIST --out DIR``.

    The inputs that need no model are checked first (``--data``, ``--class-names``, ``--out`` apart from the data),
    then the model is loaded and the model files fingerprinted for the store's manifest.
    """
    from finercam.dataset.pipeline import run_dataset
    from finercam.dataset.settings import autocast_for
    from finercam.dataset.sources import check_data, open_source, read_class_names
    from finercam.fingerprint import FINGERPRINTS, model_fingerprints
    from finercam.images import check_apart
    from finercam.runtime import cpu_threads, resolve_device

    check_data(args.data)
    check_apart(args.data, args.out)
    autocast_for(args.amp, resolve_device(args.device))  # --amp on the CPU is refused before the model loads
    given_names = read_class_names(args.class_names) if args.class_names else None
    loaded, device = _load(args)
    count = len(loaded.class_names) if loaded.class_names else None  # else the first batch's logits tell
    if given_names is not None and count is not None and len(given_names) != count:
        raise InvalidArgumentError(
            f"--class-names {args.class_names!r} lists {len(given_names)} names but the model has {count} classes; "
            "give one name per class, in the model's class order"
        )
    if given_names is not None and loaded.class_names:
        _check_order(args.class_names, given_names, loaded.class_names)
    weights = _classifier(loaded, args)
    names = given_names if given_names is not None else loaded.class_names
    source = open_source(args.data, names)
    settings = RunSettings(
        method=args.method, layer=args.layer or loaded.target_layer or "auto", gammas=tuple(args.gammas),
        references=args.references, num_references=args.num_references, aggregation=args.aggregation,
        target=args.target, batch_size=args.batch_size, chunk_size=args.chunk_size, num_workers=args.workers,
        processes=args.processes, amp=args.amp, shard=args.shard, max_pixels=args.max_pixels, progress=not args.quiet,
        score_batch_size=args.score_batch_size,
    )
    info = {
        "spec": args.model, "weights": args.weights, "head": args.head, "class_names_file": args.class_names,
        FINGERPRINTS: model_fingerprints(args.model, args.weights, args.head),
    }
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
    """The store(s) of a view; says when the store is incomplete, and stops when it holds no chunk yet."""
    from finercam.dataset.render import check_gamma
    from finercam.dataset.store import StoreError
    from finercam.dataset.store_reader import load_store

    store = load_store(args.store if len(args.store) > 1 else args.store[0])
    if getattr(args, "gamma", None) is not None:
        check_gamma(store, args.gamma)  # once, before any image: not one error per image
    shown = ", ".join(repr(str(root)) for root in store.roots)
    if not store.chunks:
        raise StoreError(
            f"the store {shown} holds no images yet: its run lists {store.total} images, but no chunk of "
            f"{store.manifest['chunk_size']} has been written (the run stopped before its first chunk, or is still "
            "running). Run the same finercam run command again to fill it"
        )
    note = store.coverage_note()
    if note:
        _say(f"note: {note}")
    if len(store) == 0:
        _say(f"note: no image of the store was explained: all {len(store.records)} present were skipped by the run")
    return store


def run_visualize(args: argparse.Namespace) -> int:
    """``finercam visualize STORE --out DIR``."""
    from finercam.dataset.visualize import save_grids

    store = _store(args)
    written, skipped = save_grids(store, args.out, args.gamma, ids=args.ids, limit=args.limit, panel=args.panel)
    _say(f"wrote {len(written)} comparison grids to {args.out}{_incomplete(store)}")
    _left_out(skipped)
    return 0


def _incomplete(store: ResultStore) -> str:
    """``"; incomplete store: ..."`` for the last line of a view, or nothing when every chunk is present."""
    if not store.missing_chunks:
        return ""
    return f"; incomplete store: {len(store.records)} of the run's {store.total} images present, see the note above"


def _left_out(skipped: list[tuple[str, str]], shown: int = 10) -> None:
    for image_id, reason in skipped[:shown]:
        _say(f"  left out {image_id}: {reason}")
    if len(skipped) > shown:
        _say(f"  ... and {len(skipped) - shown} more left out")


def run_report(args: argparse.Namespace) -> int:
    """``finercam report STORE --out FILE.html``."""
    from finercam.dataset.gallery import write_gallery

    store = _store(args)
    path, left_out = write_gallery(store, args.out, args.gamma, limit=args.limit or None, order=args.order)
    _say(f"wrote {path} ({len(store)} explained images in the store; {len(left_out)} left out of the gallery"
         f"{_incomplete(store)})")
    _left_out(left_out)
    return 0


def run_export(args: argparse.Namespace) -> int:
    """``finercam export STORE --out DIR --format png|official``."""
    from finercam.dataset.export import export_official, export_overlays

    store = _store(args)
    exporter = export_official if args.format == "official" else export_overlays
    report = exporter(store, args.out, args.gamma, limit=args.limit)
    _say(f"wrote {len(report.written)} {args.format} files to {args.out}{_incomplete(store)}")
    _left_out(report.skipped)
    return 0


def dispatch(args: argparse.Namespace) -> int:
    """Run the command named by ``args.command`` (one of :data:`COMMANDS`); returns the exit status."""
    return {"run": run_run, "visualize": run_visualize, "report": run_report, "export": run_export}[args.command](args)
