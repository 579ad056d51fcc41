"""``finercam synth``: write the synthetic birds dataset (ImageFolder tree, ``annotations.json``, ``preview.png``)."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from finercam.runtime import cpu_threads
from finercam.synth.dataset import SynthDataset, resolve_config
from finercam.synth.io import load_dataset, write_dataset
from finercam.synth.spec import SynthArgumentError


def preview_grid(dataset: SynthDataset, per_class: int = 8) -> Tensor:
    """``(3, C * H, per_class * W)`` image: one row of examples per class (blank where a class has fewer)."""
    size, rows = dataset.config.image_size, []
    for label in range(dataset.config.num_classes):
        chosen = dataset.images[(dataset.labels == label).nonzero()[:per_class, 0]]
        row = torch.ones(per_class, 3, size, size)
        row[: len(chosen)] = chosen
        rows.append(torch.cat(list(row), dim=2))
    return torch.cat(rows, dim=1)


BYTES_PER_PIXEL = 40
"""Peak memory per pixel of a split while it is generated and converted (float32 images and their copies, 8-bit
pixels, part maps): a split is generated in memory before it is written."""


def physical_memory() -> int | None:
    """This machine's physical memory in bytes, when the system says."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return None


def check_memory(train: int, test: int, size: int, available: int | None = None) -> None:
    """Refuse a split that cannot fit in memory (``available`` bytes, default: the physical memory) before any work.

    Raises:
        SynthArgumentError: naming the split, its estimated need and what is available.
    """
    available = physical_memory() if available is None else available
    if not available:
        return
    for name, count in (("train", train), ("test", test)):
        need = count * size * size * BYTES_PER_PIXEL
        if need > available:
            raise SynthArgumentError(
                f"--{name} {count} images of {size} px need about {need / 2**30:.1f} GiB of memory (a split is "
                f"generated in memory before it is written) but this machine has {available / 2**30:.1f} GiB: write "
                "fewer images per run (e.g. into several --out folders with different --seed)"
            )


def run_synth(args: argparse.Namespace) -> int:
    """Run the command from parsed arguments (torch's thread count restored afterwards); returns the exit status."""
    with cpu_threads(args.threads):
        return _run_synth(args)


def _run_synth(args: argparse.Namespace) -> int:
    options = {"image_size": args.size, "num_genera": args.genera, "species_per_genus": args.species,
               "occlusion": args.occlusion, "distractors": args.distractors, "max_rotation": args.max_rotation,
               "min_visible": args.min_visible, "noise": args.noise}
    if args.scale is not None:
        options["scale"] = tuple(args.scale)
    config = resolve_config(**options)
    check_memory(args.train, args.test, config.image_size)
    start = time.perf_counter()
    path = write_dataset(args.out, train=args.train, test=args.test, seed=args.seed, config=config,
                         overwrite=args.overwrite)
    seconds = time.perf_counter() - start
    out = Path(args.out)
    sample = load_dataset(out, "test" if args.test else "train")
    grid = preview_grid(sample, per_class=8)
    picture = Image.fromarray((grid * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())
    picture.resize((2 * picture.width, 2 * picture.height), Image.Resampling.NEAREST).save(out / "preview.png")
    print(f"wrote {args.train} train + {args.test} test images of {config.num_classes} classes "
          f"({config.num_genera} genera x {config.species_per_genus} species, {config.image_size} px) "
          f"to {out} in {seconds:.1f} s")
    print(f"annotations: {path}; preview (one row per class): {out / 'preview.png'}")
    for name in sample.class_names:
        print(f"  {name}")
    return 0
