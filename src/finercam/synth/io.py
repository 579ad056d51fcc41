"""Write the dataset as an ImageFolder tree with one annotation file, and read it back.

Layout of ``out/``::

    train/<class name>/<index>.png     test/<class name>/<index>.png     annotations.json

Class folder names start with the zero-padded label, so sorting them (as ``torchvision.datasets.ImageFolder`` does)
gives the labels. ``annotations.json`` (compact JSON) holds::

    format: "finercam-synth", version: 1, seed, split_seeds: {split: seed}, config: {SynthConfig fields},
    parts: [names], part_map_values: {"background": 0, <part>: i + 1, "occluder": len(parts) + 1},
    part_map_encoding: "base64 of zlib-compressed uint8 (H, W), row-major",
    classes: [{label, name, genus, genus_index, attributes: {part: colour or "plain"}}],
    differing_parts: [[parts that differ between class a and class b for b] for a],
    images: [{path, split, label, genus, part_map}]

Each split is ``generate(n, split_seeds[split], config)``, so it can be regenerated in memory with its individuals.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from finercam.progress import Progress
from finercam.synth.dataset import SynthDataset, generate, resolve_config
from finercam.synth.spec import OCCLUDER, PARTS, SynthArgumentError, SynthConfig, differing_parts, species_of

FORMAT, VERSION, ANNOTATIONS, SPLITS = "finercam-synth", 1, "annotations.json", ("train", "test")
PREVIEW, STAGING = "preview.png", ".synth-partial"


def split_seeds(seed: int) -> dict[str, int]:
    """The seed of each split, derived from the dataset's seed (distinct splits, distinct individuals)."""
    drawn = torch.randint(0, 2**62, (len(SPLITS),), generator=torch.Generator().manual_seed(seed))
    return dict(zip(SPLITS, drawn.tolist(), strict=True))


def _encode(part_map: np.ndarray) -> str:
    return base64.b64encode(zlib.compress(part_map.tobytes(), 9)).decode("ascii")


def decode_part_map(text: str, size: int) -> np.ndarray:
    """A part map stored in ``annotations.json`` as a ``(size, size)`` uint8 array."""
    return np.frombuffer(zlib.decompress(base64.b64decode(text)), dtype=np.uint8).reshape(size, size)


def write_dataset(
    out_dir: str | Path,
    *,
    train: int = 2000,
    test: int = 500,
    seed: int = 0,
    config: SynthConfig | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
    **overrides: object,
) -> Path:
    """Generate the train and test splits and write them as PNGs plus ``annotations.json``.

    Args:
        out_dir: the output folder (created if needed).
        train, test: images per split (each split's classes are balanced).
        seed: the dataset seed; see :func:`split_seeds`.
        config: the configuration (default :class:`SynthConfig`); ``**overrides`` replace some of its fields.
        progress: counts the images written (and says which split is generated), e.g. a
            :class:`finercam.progress.Progress` of ``train + test`` images.
        overwrite: replace the ``train/``, ``test/``, ``annotations.json`` and ``preview.png`` already in ``out_dir``
            (split folders only when they hold nothing but ``<class>/<number>.png``). The new dataset is written
            into ``out_dir/.synth-partial/`` and moved into place once complete, so an interrupted run leaves the
            old one as it was.

    Returns:
        The path of the annotation file.
    """
    config = resolve_config(config, **overrides)
    sizes = {"train": train, "test": test}
    for name, count in sizes.items():
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise SynthArgumentError(f"{name}={count!r} is not allowed: expected an int >= 0")
    if train + test == 0:
        raise SynthArgumentError("train + test must be at least 1 image")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise SynthArgumentError(f"{out} exists and is not a folder")
    existing = [out / name for name in (*SPLITS, ANNOTATIONS, PREVIEW) if (out / name).exists()]
    if existing and not overwrite:
        names = ", ".join(path.name for path in existing)
        interrupted = "" if (out / ANNOTATIONS).exists() else " (without annotations.json: not a complete dataset)"
        raise SynthArgumentError(
            f"{out} already holds {names}{interrupted}; pass overwrite=True (--overwrite) to replace them"
        )
    if overwrite:
        _check_replaceable(existing)
    staging = out / STAGING  # the new dataset is written aside, and replaces the old one only once complete
    if staging.exists():
        shutil.rmtree(staging)  # an interrupted run's (finercam's own folder)
    seeds, classes, records = split_seeds(seed), species_of(config), []
    for split in SPLITS:
        if progress is not None:
            progress.note(f"generating the {sizes[split]} {split} images")
        data = generate(sizes[split], seeds[split], config)
        if progress is not None:
            progress.note(f"writing the {split} images")
        pixels = (data.images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        maps = data.part_map.numpy()
        width = max(5, len(str(len(data) - 1)))
        for index, (label, genus) in enumerate(zip(data.labels.tolist(), data.genus.tolist(), strict=True)):
            relative = f"{split}/{classes[label].name}/{index:0{width}d}.png"
            (staging / relative).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels[index]).save(staging / relative)
            if progress is not None:
                progress.update(1)
            records.append({"path": relative, "split": split, "label": label, "genus": genus,
                            "part_map": _encode(maps[index])})
    annotation = {
        "format": FORMAT, "version": VERSION, "seed": seed, "split_seeds": seeds, "config": config.to_dict(),
        "parts": list(PARTS),
        "part_map_values": {"background": 0, **{p: i for i, p in enumerate(PARTS, start=1)}, "occluder": OCCLUDER},
        "part_map_encoding": "base64 of zlib-compressed uint8 (H, W), row-major",
        "classes": [{"label": c.label, "name": c.name, "genus": c.genus, "genus_index": c.genus_index,
                     "attributes": c.values} for c in classes],
        "differing_parts": [[list(differing_parts(config, a.label, b.label)) for b in classes] for a in classes],
        "images": records,
    }
    (staging / ANNOTATIONS).write_text(json.dumps(annotation, separators=(",", ":")))
    for path in existing:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    for split in SPLITS:
        if (staging / split).exists():
            os.replace(staging / split, out / split)
    os.replace(staging / ANNOTATIONS, out / ANNOTATIONS)  # last: a folder with annotations.json is complete
    staging.rmdir()
    return out / ANNOTATIONS


def _check_replaceable(existing: list[Path]) -> None:
    """Refuse to delete split folders that hold anything but ``<class>/<number>.png`` files (not a finercam synth
    dataset: the user's own images)."""
    for folder in (path for path in existing if path.name in SPLITS):
        if not folder.is_dir():
            raise SynthArgumentError(f"{folder} is not a folder, so it is not a finercam synth split; move it away")
        for entry in folder.rglob("*"):
            relative = entry.relative_to(folder)
            ours = (entry.is_dir() and len(relative.parts) == 1) or (
                entry.is_file() and len(relative.parts) == 2 and entry.suffix == ".png" and entry.stem.isdigit()
            )
            if not ours:
                raise SynthArgumentError(
                    f"{folder} holds {str(relative)!r}, which finercam synth does not write, so --overwrite does not "
                    "delete it: move your files away, or write the dataset into another --out folder"
                )


def load_annotations(root: str | Path) -> dict[str, Any]:
    """The parsed annotation file of a written dataset (``root`` is its folder or the file itself)."""
    path = Path(root)
    path = path / ANNOTATIONS if path.is_dir() else path
    if not path.is_file():
        raise SynthArgumentError(f"no {ANNOTATIONS} at {path}: write one with finercam synth --out DIR")
    annotation = json.loads(path.read_text())
    if annotation.get("format") != FORMAT or annotation.get("version") != VERSION:
        raise SynthArgumentError(f"{path} is not a {FORMAT} version {VERSION} annotation file")
    return annotation


def load_dataset(root: str | Path, split: str = "train") -> SynthDataset:
    """Read one split of a dataset written by :func:`write_dataset` (images from the PNGs, so quantised to 1/255).

    Args:
        root: the dataset folder (or its ``annotations.json``).
        split: ``"train"`` or ``"test"``.

    Returns:
        The dataset without individuals (regenerate them with ``generate(n, split_seeds[split], config)``).
    """
    if split not in SPLITS:
        raise SynthArgumentError(f"split={split!r} is not allowed: expected one of {list(SPLITS)}")
    annotation = load_annotations(root)
    folder = Path(root) if Path(root).is_dir() else Path(root).parent
    config = SynthConfig.from_dict({k: tuple(v) if isinstance(v, list) else v
                                    for k, v in annotation["config"].items()})
    records = [record for record in annotation["images"] if record["split"] == split]
    size = config.image_size
    images = torch.zeros(len(records), 3, size, size)
    maps = torch.zeros(len(records), size, size, dtype=torch.uint8)
    for i, record in enumerate(records):
        with Image.open(folder / record["path"]) as image:
            images[i] = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).float() / 255
        maps[i] = torch.from_numpy(decode_part_map(record["part_map"], size).copy())
    labels = torch.tensor([record["label"] for record in records], dtype=torch.long)
    genus = torch.tensor([record["genus"] for record in records], dtype=torch.long)
    return SynthDataset(images=images, labels=labels, genus=genus, part_map=maps, config=config)
