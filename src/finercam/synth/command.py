"""``finercam synth``: write the synthetic birds dataset (ImageFolder tree, ``annotations.json``, ``preview.png``)."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from PIL import Image

from finercam.progress import Progress
from finercam.runtime import cpu_threads
from finercam.synth.dataset import resolve_config
from finercam.synth.io import PREVIEW, load_annotations, write_dataset
from finercam.synth.spec import SynthArgumentError

PREVIEW_CELL = 128
"""The largest side of one image in the preview, in pixels (smaller images are enlarged twice, as pixels)."""


def write_preview(root: Path, split: str, path: Path, per_class: int = 8) -> None:
    """``path``: one row of ``per_class`` examples per class of a written split (blank where a class has fewer), read
    from their files, each shown at most :data:`PREVIEW_CELL` pixels wide, so the preview's size does not grow with
    the images' (a 1024-pixel dataset of 60 classes would otherwise make a 24,576-pixel-wide, 6 GB picture)."""
    annotation = load_annotations(root)
    size, classes = int(annotation["config"]["image_size"]), len(annotation["classes"])
    cell = min(2 * size, PREVIEW_CELL) if size <= PREVIEW_CELL // 2 else min(size, PREVIEW_CELL)
    chosen: dict[int, list[str]] = {}
    for record in annotation["images"]:
        if record["split"] == split and len(chosen.setdefault(record["label"], [])) < per_class:
            chosen[record["label"]].append(record["path"])
    picture = Image.new("RGB", (per_class * cell, classes * cell), (255, 255, 255))
    resample = Image.Resampling.NEAREST if cell >= size else Image.Resampling.BOX
    for label in range(classes):
        for column, relative in enumerate(chosen.get(label, [])):
            with Image.open(root / relative) as image:
                picture.paste(image.convert("RGB").resize((cell, cell), resample), (column * cell, label * cell))
    picture.save(path)


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


FLAGS = {"image_size": "--size", "num_genera": "--genera", "species_per_genus": "--species",
         "occlusion": "--occlusion", "distractors": "--distractors", "max_rotation": "--max-rotation",
         "min_visible": "--min-visible", "noise": "--noise", "scale": "--scale"}
"""The command-line flag of each :class:`SynthConfig` field."""


def _with_flags(message: str) -> str:
    """``num_genera=6 is not allowed: ...`` said with the flag: ``--genera 6 is not allowed: ...``."""
    setting, separator, rest = message.partition(" is not allowed")
    field, _, value = setting.partition("=")
    if not separator or field not in FLAGS:
        return message
    if field == "scale":  # (0.3, 0.2) -> 0.3 0.2, as typed
        value = " ".join(value.strip("()").split(", "))
    return f"{FLAGS[field]} {value}{separator}{rest}"


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
    try:
        config = resolve_config(**options)
    except SynthArgumentError as error:
        raise SynthArgumentError(_with_flags(str(error))) from None
    check_memory(args.train, args.test, config.image_size)
    start = time.perf_counter()
    progress = Progress(args.train + args.test)
    path = write_dataset(args.out, train=args.train, test=args.test, seed=args.seed, config=config,
                         overwrite=args.overwrite, progress=progress)
    seconds = time.perf_counter() - start
    out = Path(args.out)
    write_preview(out, "test" if args.test else "train", out / PREVIEW)
    print(f"wrote {args.train} train + {args.test} test images of {config.num_classes} classes "
          f"({config.num_genera} genera x {config.species_per_genus} species, {config.image_size} px) "
          f"to {out} in {seconds:.1f} s")
    print(f"annotations: {path}; preview (one row per class): {out / PREVIEW}")
    for entry in load_annotations(out)["classes"]:
        print(f"  {entry['name']}")
    return 0
