"""Benchmark of the finercam engine against a plain forward pass and against grad-cam's and torchcam's FinerCAM.

Run from the repository root::

    .venv/bin/python benchmarks/engine.py                      # ResNet-50 and ViT-B/16, 224 px, batch 8
    .venv/bin/python benchmarks/engine.py --quick              # ResNet-18, 64 px, batch 2: a smoke run in seconds
    .venv/bin/python benchmarks/engine.py --models resnet50 --repeats 5 --json out.json

For every model it times, per batch, on random weights and random images:

* ``forward``: ``with torch.inference_mode(): model(x)``, the model in eval mode;
* ``finercam``: ``finercam.FinerCAM(model, layer, "gradcam")(x, references="nearest", num_references=3,
  gamma=0.6)``;
* ``sweep``: the same object's ``cam.sweep(x, gammas=[0, 0.3, 0.6, 1.0, 2.0])``;
* ``classes``: ``cam.explain_classes(x, classes=3)``, the three top predictions from one forward pass;
* ``separate``: the same three classes with three ``cam(x, targets=...)`` calls (the classes given, untimed);
* ``gradcam-lib``: ``pytorch_grad_cam.FinerCAM(model, [layer], reshape_transform, base_method=GradCAM)(x,
  alpha=0.6)`` with its default targets (it picks the nearest references itself);
* ``torchcam-lib``: ``torchcam.methods.FinerCAM(model, layer, base_method=GradCAM, gamma=0.6, num_references=3)``
  on the predicted classes, after the forward pass it hooks (it picks the nearest references itself).

The measurements are interleaved (each round runs every variant once, in a rotating order) after a warm-up, because
the machine is noisy. A sample during which other processes (or the hypervisor) took more than ``--max-foreign``
cores, read from ``/proc/stat``, is marked contended and left out of the median; contended rounds are redone up to
``3 * --repeats`` rounds or ``--budget`` seconds. The medians (clean samples) and minima (all) are reported. Peak
memory is measured by running every variant once in a fresh subprocess (see :func:`memory_probe`). The targets are
checked and printed; the exit code is always 0, since this is a report and not a test.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from engine_variants import (
    CLASSES,
    GAMMA,
    LIBRARY_VARIANTS,
    MODELS,
    NUM_REFERENCES,
    SWEEP_GAMMAS,
    VARIANTS,
    build_model,
    clear_parameter_grads,
    make_images,
    make_variant,
    tv,
)
from measure import Sample, is_clean, reset_peak_rss, status_kb, timed  # this folder is on sys.path as a script

from finercam.dataset.parallel import usable_cores

# Targets: finercam at least 2.5x faster than grad-cam's FinerCAM, as fast as torchcam's (within 10 %: both take one
# forward and differentiate the layer only) with at most half its peak memory (finercam records no graph below the
# layer), at most 1.3x a forward pass, and a five-gamma sweep at most 1.15x a single gamma.
TARGET_SPEEDUP_VS_GRADCAM = 2.5
TARGET_SPEEDUP_VS_TORCHCAM = 0.9
TARGET_MEMORY_VS_TORCHCAM = 0.5
TARGET_FINERCAM_OVER_FORWARD = 1.3
TARGET_SWEEP_OVER_SINGLE = 1.15
TARGET_CLASSES_OVER_SEPARATE = 0.6

PROBE_PREFIX = "MEMORY-PROBE-RESULT "
# In the probe subprocesses: a fixed mmap threshold, so that glibc returns freed large blocks (tensors) to the OS
# at once and RSS follows the live memory instead of the allocator's caches.
PROBE_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}

MEMORY_METHOD = (
    "peak memory = peak RSS of a fresh subprocess (`benchmarks/engine.py --_memory-probe MODEL VARIANT`) during one "
    "call of the variant (after one untimed inference forward that initialises thread pools and kernels), minus "
    "the RSS just before that call (model, input and imports excluded). The peak is "
    "VmHWM from /proc/self/status after resetting it with `echo 5 > /proc/self/clear_refs` just before the call; "
    "where that reset is unavailable, resource.getrusage(RUSAGE_SELF).ru_maxrss (then a lower bound if an earlier "
    f"peak was higher). Probes run with {' '.join(f'{k}={v}' for k, v in PROBE_ENV.items())} so freed tensors "
    "leave RSS; 1 MB = 2**20 bytes."
)


# --------------------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------------------


def time_model(name: str, args: argparse.Namespace, budget_s: float) -> dict[str, list[Sample]]:
    """Interleaved timings of every variant: a warm-up, then rounds that run each variant once in a rotating order.

    Rounds continue until every variant has ``args.repeats`` clean samples (other processes used at most
    ``args.max_foreign`` cores meanwhile), or ``3 * repeats`` rounds ran, or ``budget_s`` is spent.
    """
    started = time.perf_counter()
    model = build_model(name, args.size)
    images = make_images(args.batch, args.size)
    calls = {variant: make_variant(name, variant, model, args.size) for variant in VARIANTS}

    def run(variant: str) -> Sample:
        gc.collect()
        sample = timed(calls[variant], images)
        if variant in LIBRARY_VARIANTS:
            clear_parameter_grads(model)
        return sample

    if args.verbose:
        print(f"  [{name}] ms per batch; * marks a contended sample", file=sys.stderr, flush=True)
    for _ in range(args.warmup):
        for variant in VARIANTS:
            run(variant)
    samples: dict[str, list[Sample]] = {variant: [] for variant in VARIANTS}
    for repeat in range(3 * args.repeats):
        clean = min(sum(is_clean(s, args.max_foreign) for s in samples[v]) for v in VARIANTS)
        if repeat >= args.repeats and (clean >= args.repeats or time.perf_counter() - started > budget_s):
            break
        shift = repeat % len(VARIANTS)
        for variant in VARIANTS[shift:] + VARIANTS[:shift]:
            samples[variant].append(run(variant))
        if args.verbose:
            last = {v: samples[v][-1] for v in VARIANTS}
            marks = {v: "" if is_clean(s, args.max_foreign) else "*" for v, s in last.items()}
            done = ", ".join(f"{v} {s.ms:.0f}{marks[v]}" for v, s in last.items())
            print(f"  [{name}] round {repeat + 1}: {done} ms", file=sys.stderr, flush=True)
    return samples


# --------------------------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------------------------


def memory_probe(name: str, variant: str, args: argparse.Namespace) -> dict[str, object]:
    """Run ``variant`` once, cold, in this (fresh) process; report its peak RSS above the RSS just before it."""
    model = build_model(name, args.size)
    images = make_images(args.batch, args.size)
    call = make_variant(name, variant, model, args.size)
    with torch.inference_mode():  # warm-up common to all variants: thread pools, kernels, lazy initialisation
        model(images)
    gc.collect()
    rss_before_kb = status_kb("VmRSS")
    reset = reset_peak_rss()
    maxrss_before_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    result = call(images)
    elapsed = (time.perf_counter() - start) * 1000.0
    hwm_kb = status_kb("VmHWM") if reset else None
    maxrss_after_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    del result
    peak_kb = hwm_kb if hwm_kb is not None else maxrss_after_kb
    baseline_kb = rss_before_kb if rss_before_kb is not None else maxrss_before_kb
    return {
        "model": name,
        "variant": variant,
        "peak_delta_mb": (peak_kb - baseline_kb) / 1024.0,
        "rss_before_mb": baseline_kb / 1024.0,
        "peak_rss_mb": peak_kb / 1024.0,
        "source": "VmHWM after clear_refs reset" if hwm_kb is not None else "ru_maxrss",
        "cold_call_ms": elapsed,
    }


def run_probe_subprocess(name: str, variant: str, args: argparse.Namespace) -> dict[str, object]:
    command = [
        sys.executable, str(Path(__file__).resolve()), "--_memory-probe", name, variant,
        "--batch", str(args.batch), "--size", str(args.size), "--threads", str(args.threads),
    ]  # fmt: skip
    env = {**os.environ, **PROBE_ENV}
    completed = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    for line in completed.stdout.splitlines():
        if line.startswith(PROBE_PREFIX):
            return json.loads(line[len(PROBE_PREFIX) :])
    tail = (completed.stderr or completed.stdout).strip().splitlines()[-5:]
    return {"model": name, "variant": variant, "peak_delta_mb": None, "error": " | ".join(tail)}


def measure_memory(args: argparse.Namespace) -> dict[str, dict[str, dict[str, object]]]:
    jobs = [(name, variant) for name in args.models for variant in VARIANTS]
    with ThreadPoolExecutor(max_workers=max(1, args.probe_jobs)) as pool:
        results = list(pool.map(lambda job: run_probe_subprocess(*job, args), jobs))
    memory: dict[str, dict[str, dict[str, object]]] = {}
    for (name, variant), result in zip(jobs, results, strict=True):
        memory.setdefault(name, {})[variant] = result
    return memory


# --------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------


def summarise(samples: dict[str, list[Sample]], args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Median over the clean samples (over all of them where fewer than 3 are clean) and minimum over all."""
    stats: dict[str, dict[str, float]] = {}
    for variant, runs in samples.items():
        clean = [s.ms for s in runs if is_clean(s, args.max_foreign)]
        used = clean if len(clean) >= min(3, len(runs)) else [s.ms for s in runs]
        stats[variant] = {
            "median_ms": statistics.median(used),
            "min_ms": min(s.ms for s in runs),
            "samples": len(runs),
            "clean_samples": len(clean),
            "median_over_clean": used is clean,
        }
    forward, single = stats["forward"]["median_ms"], stats["finercam"]["median_ms"]
    stats["forward"]["ratio"] = 1.0
    stats["finercam"]["ratio"] = single / forward
    stats["sweep"]["ratio"] = stats["sweep"]["median_ms"] / single
    stats["separate"]["ratio"] = 1.0
    stats["classes"]["ratio"] = stats["classes"]["median_ms"] / stats["separate"]["median_ms"]
    for variant in LIBRARY_VARIANTS:
        stats[variant]["ratio"] = stats[variant]["median_ms"] / single
    return stats


RATIO_LABELS = {
    "forward": "1.00 (reference)",
    "finercam": "{:.2f}x forward",
    "sweep": "{:.2f}x finercam",
    "classes": "{:.2f}x separate",
    "separate": "1.00 (3 calls)",
    "gradcam-lib": "{:.2f}x finercam (speed-up)",
    "torchcam-lib": "{:.2f}x finercam (speed-up)",
}


def check_targets(name: str, stats: dict[str, dict[str, float]]) -> list[tuple[str, bool, str]]:
    speedup, torchcam_speedup = stats["gradcam-lib"]["ratio"], stats["torchcam-lib"]["ratio"]
    over_forward = stats["finercam"]["ratio"]
    sweep = stats["sweep"]["ratio"]
    return [
        (f"{name}: finercam >= {TARGET_SPEEDUP_VS_GRADCAM}x faster than grad-cam FinerCAM",
         speedup >= TARGET_SPEEDUP_VS_GRADCAM, f"{speedup:.2f}x"),
        (f"{name}: finercam at least {TARGET_SPEEDUP_VS_TORCHCAM}x the speed of torchcam FinerCAM",
         torchcam_speedup >= TARGET_SPEEDUP_VS_TORCHCAM, f"{torchcam_speedup:.2f}x"),
        (f"{name}: finercam <= {TARGET_FINERCAM_OVER_FORWARD}x forward",
         over_forward <= TARGET_FINERCAM_OVER_FORWARD, f"{over_forward:.2f}x"),
        (f"{name}: sweep(5 gammas) <= {TARGET_SWEEP_OVER_SINGLE}x single gamma",
         sweep <= TARGET_SWEEP_OVER_SINGLE, f"{sweep:.2f}x"),
        (f"{name}: explain_classes(3) <= {TARGET_CLASSES_OVER_SEPARATE}x three separate calls",
         stats["classes"]["ratio"] <= TARGET_CLASSES_OVER_SEPARATE, f"{stats['classes']['ratio']:.2f}x"),
    ]  # fmt: skip


def check_memory(name: str, memory: dict[str, dict[str, object]]) -> list[tuple[str, bool, str]]:
    """finercam's peak memory against torchcam's (both measured in fresh processes)."""
    ours, theirs = memory["finercam"].get("peak_delta_mb"), memory["torchcam-lib"].get("peak_delta_mb")
    if not isinstance(ours, float) or not isinstance(theirs, float) or theirs <= 0:
        return [(f"{name}: finercam peak memory <= {TARGET_MEMORY_VS_TORCHCAM}x torchcam's", False, "not measured")]
    ratio = ours / theirs
    return [(f"{name}: finercam peak memory <= {TARGET_MEMORY_VS_TORCHCAM}x torchcam's",
             ratio <= TARGET_MEMORY_VS_TORCHCAM, f"{ratio:.2f}x ({ours:.0f} / {theirs:.0f} MB)")]


def print_report(
    args: argparse.Namespace,
    stats: dict[str, dict[str, dict[str, float]]],
    memory: dict[str, dict[str, dict[str, object]]] | None,
    checks: list[tuple[str, bool, str]],
) -> None:
    print()
    print(
        f"## finercam engine benchmark: batch {args.batch}, {args.size} px, CPU ({platform.machine()}, "
        f"{os.cpu_count()} cores), {args.threads} torch threads, torch {torch.__version__}"
    )
    print()
    print(
        f"Timing: {args.warmup} warm-up round, then interleaved rounds (each variant once, rotating order) until "
        f"{args.repeats} clean samples per variant (max {3 * args.repeats} rounds / {args.budget:.0f} s). A sample "
        f"is contended when other processes or the hypervisor (steal) used > {args.max_foreign} cores meanwhile "
        "(from /proc/stat); medians are over clean samples, minima over all. ms per batch."
    )
    print(f"Load average (1 min) before / after: {args.load_before:.2f} / {os.getloadavg()[0]:.2f}.")
    print()
    print("| model | variant | median ms | min ms | ratio | peak MB | clean/all samples |")
    print("|---|---|---:|---:|---|---:|---|")
    for name in args.models:
        for variant in VARIANTS:
            row = stats[name][variant]
            ratio = RATIO_LABELS[variant].format(row["ratio"])
            peak = "n/a"
            if memory is not None:
                value = memory[name][variant].get("peak_delta_mb")
                peak = f"{value:.0f}" if isinstance(value, float) else "error"
            counts = f"{row['clean_samples']}/{row['samples']}" + ("" if row["median_over_clean"] else " (all used)")
            print(
                f"| {name} | {variant} | {row['median_ms']:.1f} | {row['min_ms']:.1f} | {ratio} | {peak} | {counts} |"
            )
    print()
    print(
        "Variants: forward = `torch.inference_mode()` forward; finercam = FinerCAM(..., 'gradcam')(x, "
        f"references='nearest', num_references={NUM_REFERENCES}, gamma={GAMMA}); sweep = cam.sweep(x, "
        f"gammas={SWEEP_GAMMAS}); classes = cam.explain_classes(x, classes={CLASSES}); separate = {CLASSES} "
        "cam(x, targets=...) calls on the same classes (found before timing); "
        f"gradcam-lib = pytorch_grad_cam.FinerCAM(base_method=GradCAM)(x, alpha={GAMMA}); "
        f"torchcam-lib = torchcam.methods.FinerCAM(base_method=GradCAM, gamma={GAMMA}, "
        f"num_references={NUM_REFERENCES})(predicted classes, scores)."
    )
    print(f"Memory: {MEMORY_METHOD}" if memory is not None else "Memory: not measured (--no-memory).")
    if memory is not None:
        errors = [f"{r['model']}/{r['variant']}: {r['error']}" for m in memory.values() for r in m.values()
                  if "error" in r]  # fmt: skip
        for error in errors:
            print(f"  memory probe failed: {error}")
    print()
    print("### Targets")
    for label, passed, value in checks:
        print(f"- {'PASS' if passed else 'FAIL'}: {label} (measured {value})")
    missed = [f"{label} (measured {value})" for label, passed, value in checks if not passed]
    print()
    print("TARGETS MET" if not missed else "TARGETS MISSED: " + "; ".join(missed))


# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models",
        nargs="+",
        choices=sorted(MODELS),
        default=None,
        help="models to benchmark (default: resnet50 vit_b_16)",
    )
    parser.add_argument("--batch", type=int, default=None, help="images per batch (default 8)")
    parser.add_argument("--size", type=int, default=None, help="image side in pixels (default 224)")
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="clean timed samples wanted per variant (default 10); contended rounds are redone, up "
        "to 3x this many rounds or --budget",
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=300.0,
        help="seconds of timing (all models) after which no extra round starts (default 300)",
    )
    parser.add_argument(
        "--max-foreign",
        type=float,
        default=0.25,
        help="a sample is contended when other processes used more than this many cores during it "
        "(default 0.25); medians use the clean samples",
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds before timing (default 1)")
    parser.add_argument(
        "--threads", type=int, default=usable_cores(), help="torch intra-op threads (default: the usable cores)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON to this file")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: resnet18, 64 px, batch 2, 2 repeats (explicit options still win)",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--probe-jobs", type=int, default=2, help="memory probes run in parallel (default 2)")
    parser.add_argument("--verbose", action="store_true", help="print every repeat's timings to stderr")
    parser.add_argument("--_memory-probe", nargs=2, metavar=("MODEL", "VARIANT"), dest="memory_probe",
                        default=None, help=argparse.SUPPRESS)  # fmt: skip
    args = parser.parse_args(argv)
    quick = {"models": ["resnet18"], "batch": 2, "size": 64, "repeats": 2}
    full = {"models": ["resnet50", "vit_b_16"], "batch": 8, "size": 224, "repeats": 10}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.batch < 1 or args.size < 16 or args.repeats < 1 or args.warmup < 0 or args.threads < 1:
        parser.error("--batch, --repeats and --threads must be >= 1, --size >= 16 and --warmup >= 0")
    for name in args.models:
        patch = MODELS[name].patch
        if patch is not None and args.size % patch:
            parser.error(f"{name} needs --size divisible by its patch size {patch}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.memory_probe is not None:
        name, variant = args.memory_probe
        if name not in MODELS or variant not in VARIANTS:
            print(f"unknown model or variant: {name} {variant}", file=sys.stderr)
            return 2
        print(PROBE_PREFIX + json.dumps(memory_probe(name, variant, args)), flush=True)
        return 0

    started = time.perf_counter()
    args.load_before = os.getloadavg()[0]
    stats: dict[str, dict[str, dict[str, float]]] = {}
    samples: dict[str, dict[str, list[Sample]]] = {}
    checks: list[tuple[str, bool, str]] = []
    for name in args.models:
        print(f"timing {name} ...", file=sys.stderr, flush=True)
        samples[name] = time_model(name, args, args.budget / len(args.models))
        stats[name] = summarise(samples[name], args)
        checks.extend(check_targets(name, stats[name]))
        gc.collect()
    memory = None
    if not args.no_memory:
        print("measuring peak memory (one subprocess per variant) ...", file=sys.stderr, flush=True)
        memory = measure_memory(args)
        for name in args.models:
            checks.extend(check_memory(name, memory[name]))

    print_report(args, stats, memory, checks)
    elapsed = time.perf_counter() - started
    print(f"\n(total {elapsed:.0f} s)")

    if args.json is not None:
        report = {
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "environment": {
                "torch": torch.__version__,
                "torchvision": tv.__version__,
                "python": platform.python_version(),
                "machine": platform.machine(),
                "cpu_count": os.cpu_count(),
                "torch_threads": torch.get_num_threads(),
            },
            "samples": {
                name: {v: [{"ms": s.ms, "foreign_cores": s.foreign_cores} for s in runs] for v, runs in m.items()}
                for name, m in samples.items()
            },
            "stats": stats,
            "memory": memory,
            "memory_method": MEMORY_METHOD,
            "targets": [{"target": label, "passed": passed, "measured": value} for label, passed, value in checks],
            "targets_met": all(passed for _, passed, _ in checks),
            "total_s": elapsed,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
