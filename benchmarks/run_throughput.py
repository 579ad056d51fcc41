"""Throughput of ``finercam run`` end to end against the model-side CAM throughput on the same batches.

Run from the repository root::

    .venv/bin/python benchmarks/run_throughput.py                    # embedded CNN, 2,000 images at 64 px
    .venv/bin/python benchmarks/run_throughput.py --resnet 400       # + ResNet-18 (random init) on 400 images, 224 px
    .venv/bin/python benchmarks/run_throughput.py --rounds 5 --processes 2 --workers 0 --json out.json

It writes synthetic birds (:mod:`finercam.synth`) as an ImageFolder tree of PNGs, then, in one process and in
interleaved rounds (the order alternates), times

* **end to end**: :func:`finercam.dataset.run_dataset` into a fresh store, as ``finercam run`` does it on this
  machine (on the CPU: ``--processes`` forked workers, each decoding and explaining whole batches with one torch
  thread): listing, decoding, preprocessing, the CAMs, and writing the chunks (``fsync`` included);
* **model side**: the same ``FinerCAM.sweep`` calls on the same batches (same batch size, same targets, gammas and
  references), the images already decoded and normalised in memory, in both layouts: one process with torch's
  threads, and the same forked processes with one thread each. The **faster** of the two is the reference, so
  the ratio cannot be flattered by a slow model-side layout;
* **one process**: the end-to-end run with ``--processes 1`` (torch's threads, ``--workers`` decoding processes),
  reported for comparison;
* **decoding alone**: the same batches read, decoded and collated in one process, without the model.

The ratio ``end-to-end time / model-side time`` is how much the data pipeline and the store cost on top of the
CAMs (the issue's target: at most 1.3). Samples during which other processes took more than ``--max-foreign`` cores
(read from ``/proc``) are reported as contended. It also counts the store's files and extrapolates them, and the
store's size, to 100,000 images.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from measure import Sample, is_clean, timed  # this folder is on sys.path when run as a script
from torch import nn

from finercam import FinerCAM
from finercam.dataset import RunSettings, open_source, run_dataset
from finercam.dataset.decode import decode
from finercam.dataset.loading import ImageDataset, batch_loader, plan_batches
from finercam.dataset.parallel import default_processes, forked_map
from finercam.dataset.settings import default_workers
from finercam.embedded import load_embedded
from finercam.models.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from finercam.synth import SynthConfig, write_dataset


@dataclass(frozen=True)
class Case:
    name: str
    model: nn.Module
    layer: str
    preprocess: Preprocess
    class_names: tuple[str, ...]
    data: Path
    count: int


def _cpu_seconds() -> float:
    """CPU time of this process and of its reaped children (the decoding workers, joined at the end of a run)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _files(root: Path) -> tuple[int, int]:
    files = [p for p in root.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def measure_case(case: Case, args: argparse.Namespace, scratch: Path) -> dict[str, object]:
    source = open_source(case.data, case.class_names)
    settings = RunSettings(
        layer=case.layer, gammas=(0.6,), batch_size=args.batch_size, chunk_size=args.chunk_size,
        processes=args.processes, progress=False,
    )
    decoded = [decode(item.path, case.preprocess).pixels for item in source.items]
    labels = torch.tensor([item.label for item in source.items])
    batches = plan_batches(range(math.ceil(len(decoded) / settings.chunk_size)), settings.chunk_size,
                           settings.batch_size, len(decoded))
    in_memory = [(case.preprocess.normalise(torch.stack([decoded[i] for i in batch])), labels[batch])  # type: ignore[misc]
                 for batch in batches]
    cam = FinerCAM(case.model, case.layer, settings.method)

    def sweep(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        cam.sweep(batch[0], settings.gammas, batch[1], settings.references, settings.num_references,
                  settings.aggregation)

    def model_side(_: object) -> None:
        for batch in in_memory:
            sweep(batch)

    def model_side_forked(_: object) -> None:
        for _result in forked_map(sweep, in_memory, args.processes):
            pass

    stores: list[Path] = []

    def end_to_end(run_settings: RunSettings) -> Callable[[object], None]:
        def call(_: object) -> None:
            out = scratch / f"{case.name}-store-{len(stores)}"
            stores.append(out)
            run_dataset(case.model, case.preprocess, source, out, run_settings)

        return call

    def decode_only(_: object) -> None:
        dataset = ImageDataset(source.items, case.preprocess, None)
        for _batch in batch_loader(dataset, batches, settings.chunk_size, num_workers=0, pin_memory=False):
            pass

    one_process = replace(settings, processes=1, num_workers=args.workers)
    variants: dict[str, Callable[[object], None]] = {
        "end_to_end": end_to_end(settings), "model_side": model_side, "decode_only": decode_only,
    }
    if args.processes > 1:
        variants |= {"model_side_forked": model_side_forked, "end_to_end_1proc": end_to_end(one_process)}
    model_side(None)  # warm-up (allocator, autotuning, auto layer)
    samples: dict[str, list[Sample]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    for round_index in range(args.rounds):
        order = list(variants) if round_index % 2 == 0 else list(reversed(variants))
        for name in order:
            before = _cpu_seconds()
            sample = timed(variants[name], None)  # type: ignore[arg-type]
            cpu[name].append(_cpu_seconds() - before)
            samples[name].append(sample)
            contended = "" if is_clean(sample, args.max_foreign) else "  (contended)"
            print(f"  {case.name} round {round_index + 1} {name:<17} {sample.ms / 1000:7.2f} s "
                  f"{case.count / sample.ms * 1000:8.1f} img/s  cpu {cpu[name][-1]:7.2f} s  foreign cores "
                  f"{'?' if sample.foreign_cores is None else f'{sample.foreign_cores:.2f}'}{contended}", flush=True)
    files, size = _files(stores[-1])
    for store in stores:
        shutil.rmtree(store, ignore_errors=True)

    def median(name: str) -> float:
        chosen = [s.ms for s in samples[name] if is_clean(s, args.max_foreign)]
        return statistics.median(chosen or [s.ms for s in samples[name]]) / 1000

    model_layouts = {name: median(name) for name in ("model_side", "model_side_forked") if name in variants}
    best_model = min(model_layouts, key=model_layouts.__getitem__)
    result: dict[str, object] = {
        "case": case.name, "images": case.count, "batch_size": settings.batch_size, "processes": args.processes,
        "torch_threads": torch.get_num_threads(), "one_process_workers": args.workers,
        "end_to_end_s": median("end_to_end"), "model_side_s": model_layouts[best_model],
        "model_side_layout": best_model, "model_side_layouts_s": model_layouts,
        "end_to_end_cpu_s": statistics.median(cpu["end_to_end"]),
        "model_side_cpu_s": statistics.median(cpu[best_model]),
        "clean_rounds": {name: sum(is_clean(s, args.max_foreign) for s in values) for name, values in samples.items()},
        "samples": {name: [{"ms": s.ms, "foreign_cores": s.foreign_cores} for s in values]
                    for name, values in samples.items()},
        "store_files": files, "store_bytes": size,
        "files_for_100k": math.ceil(100_000 / settings.chunk_size) + 2,
        "bytes_for_100k": size / case.count * 100_000,
        "decode_only_s": median("decode_only"),
    }
    result["ratio"] = median("end_to_end") / model_layouts[best_model]
    result["cpu_ratio"] = result["end_to_end_cpu_s"] / result["model_side_cpu_s"]  # type: ignore[operator]
    if "end_to_end_1proc" in variants:
        result["one_process_ratio"] = median("end_to_end_1proc") / model_layouts[best_model]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000, help="synthetic images for the embedded CNN")
    parser.add_argument("--resnet", type=int, default=0, help="also ResNet-18 at 224 px on this many images")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--chunk-size", type=int, default=512)
    parser.add_argument("--processes", type=int,
                        help="worker processes of the run and of the forked model side (default: finercam's choice)")
    parser.add_argument("--workers", type=int,
                        help="decoding processes of the one-process run (default: finercam's choice for the CPU)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--max-foreign", type=float, default=0.5)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.workers is None:
        args.workers = default_workers(torch.device("cpu"))
    if args.processes is None:
        args.processes = default_processes(torch.device("cpu"))
    scratch = Path(tempfile.mkdtemp(prefix="finercam-run-bench-"))
    try:
        start = time.perf_counter()
        embedded = load_embedded("cnn")
        fields = set(SynthConfig.__dataclass_fields__)  # the data the embedded CNN was trained on, from its card
        config = {k: v for k, v in embedded.card.get("data", {}).get("config", {}).items() if k in fields}
        write_dataset(scratch / "birds64", train=0, test=args.images, seed=0, **config)
        print(f"wrote {args.images} synthetic 64 px PNGs in {time.perf_counter() - start:.1f} s; "
              f"{os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads, "
              f"{args.processes} worker processes", flush=True)
        cases = [Case("embedded-cnn-64px", embedded.model, embedded.target_layer,
                      Preprocess("embedded-cnn", resize=(64, 64)), embedded.class_names, scratch / "birds64" / "test",
                      args.images)]
        if args.resnet:
            from finercam.compat import import_torchvision

            tv = import_torchvision()
            write_dataset(scratch / "birds224", train=0, test=args.resnet, seed=1, **{**config, "image_size": 224})
            torch.manual_seed(0)
            resnet = tv.models.resnet18(weights=None, num_classes=len(embedded.class_names)).eval()
            cases.append(Case("resnet18-224px", resnet, "layer4",
                              Preprocess("imagenet-224", resize=(224, 224), mean=IMAGENET_MEAN, std=IMAGENET_STD),
                              embedded.class_names, scratch / "birds224" / "test", args.resnet))
        results = [measure_case(case, args, scratch) for case in cases]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print()
    print(f"{'case':<20} {'images':>6} {'end-to-end':>12} {'model side':>12} {'ratio':>6} {'cpu ratio':>9} "
          f"{'files':>6} {'files/100k':>10} {'GB/100k':>8}")
    for r in results:
        print(f"{r['case']:<20} {r['images']:>6} {r['images'] / r['end_to_end_s']:>8.1f} i/s "
              f"{r['images'] / r['model_side_s']:>8.1f} i/s {r['ratio']:>6.2f} {r['cpu_ratio']:>9.2f} "
              f"{r['store_files']:>6} {r['files_for_100k']:>10} {r['bytes_for_100k'] / 1e9:>8.2f}")
        layouts = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in r["model_side_layouts_s"].items())
        print(f"{'':<20} model side, the faster layout counts: {layouts}")
        print(f"{'':<20} decoding alone (one process): {r['decode_only_s']:.2f} s = "
              f"{r['decode_only_s'] / r['model_side_s']:.2f} x the model side")
        if "one_process_ratio" in r:
            print(f"{'':<20} one process ({r['torch_threads']} torch threads, {r['one_process_workers']} decoding "
                  f"workers): ratio {r['one_process_ratio']:.2f}")
    print(f"target: ratio <= 1.3 (end-to-end with {results[0]['processes']} processes / the faster model-side layout, "
          "wall time, medians of clean rounds, or of all rounds when none is clean); cpu ratio: the same with CPU "
          "time of this process and its workers")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
