"""Helpers of the ``finercam run`` tests: small synthetic ImageFolder trees, bad files of every kind, the embedded
CNN with its preprocessing, an exact comparison of two loaded stores, and the dataset commands run on a tiny
``python:`` model."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from finercam.dataset import ResultStore
from finercam.dataset import command as dataset_command
from finercam.dataset.store import MAP_TENSORS, ROW_TENSORS
from finercam.embedded import EmbeddedModel, load_embedded
from finercam.models.preprocess import Preprocess
from finercam.synth import SynthConfig, write_dataset

EMBEDDED_PREPROCESS = Preprocess("embedded-cnn", resize=(64, 64))
_CNN: EmbeddedModel | None = None


def cnn() -> EmbeddedModel:
    """The embedded CNN (loaded once per test process)."""
    global _CNN
    if _CNN is None:
        _CNN = load_embedded("cnn")
    return _CNN


def synth_config() -> dict[str, object]:
    """The data configuration the embedded CNN was trained on (from its model card), as ``SynthConfig`` fields."""
    fields = set(SynthConfig.__dataclass_fields__)
    return {key: value for key, value in cnn().card.get("data", {}).get("config", {}).items() if key in fields}


def synthetic_tree(folder: Path, count: int, seed: int = 5) -> Path:
    """An ImageFolder tree of ``count`` synthetic birds (64 x 64 PNG, class folders named as the CNN's classes)."""
    write_dataset(folder, train=0, test=count, seed=seed, **synth_config())
    return folder / "test"


def _rgb(height: int = 48, width: int = 64, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def write_bad_files(folder: Path) -> dict[str, str | None]:
    """One file of every awkward kind into ``folder``; the value is the skip category expected (None: explained)."""
    folder.mkdir(parents=True, exist_ok=True)
    image = _rgb()
    image.convert("CMYK").save(folder / "cmyk.jpg")
    gray16 = np.random.default_rng(1).integers(0, 65536, (48, 64)).astype(np.uint16)
    Image.fromarray(gray16).save(folder / "gray16.png")
    image.convert("P").save(folder / "palette.png")
    rgba = image.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(folder / "rgba.png")
    image.convert("L").save(folder / "gray.png")
    exif = image.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    image.save(folder / "rotated.jpg", exif=exif)
    Image.new("RGB", (1, 1), (200, 30, 30)).save(folder / "one_pixel.png")
    image.save(folder / "whole.jpg")
    data = (folder / "whole.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "whole.jpg").unlink()
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("this is not a JPEG\n")
    _rgb(400, 400, seed=3).save(folder / "huge.png")  # 160,000 pixels: over the tests' --max-pixels 100000
    return {
        "cmyk.jpg": None, "gray16.png": None, "palette.png": None, "rgba.png": None, "gray.png": None,
        "rotated.jpg": None, "one_pixel.png": None, "truncated.jpg": "corrupt or truncated", "empty.jpg": "empty file",
        "text.jpg": "not an image", "huge.png": "too large",
    }


def assert_same_store(first: ResultStore, second: ResultStore) -> None:
    """Bitwise-equal tensors and equal records (both are sorted by listing position)."""
    assert [(r.index, r.id, r.path, r.status, r.reason, r.row) for r in first.records] == [
        (r.index, r.id, r.path, r.status, r.reason, r.row) for r in second.records
    ]
    for name in (*ROW_TENSORS, *MAP_TENSORS):
        a, b = getattr(first, name), getattr(second, name)
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.equal(a, b), f"{name} differs"
    assert first.layers == second.layers


def dataset_parser() -> argparse.ArgumentParser:
    """The parser of the dataset commands alone (``run``, ``visualize``, ``report``, ``export``)."""
    parser = argparse.ArgumentParser(prog="finercam")
    dataset_command.add_commands(parser.add_subparsers(dest="command", required=True))
    return parser


def dataset_cli(*argv: str | Path) -> int:
    """Parse and run one dataset command; finercam errors are raised, not printed."""
    return dataset_command.dispatch(dataset_parser().parse_args([str(a) for a in argv]))


TINY_MODEL = """
import torch
from torch import nn


def make():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 3))
"""


def tiny_model(folder: Path) -> tuple[Path, Path, Path]:
    """A python: model file, its weights, and an unlabelled list file of 6 images of 16 x 16 pixels."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.py").write_text(TINY_MODEL)
    namespace: dict[str, object] = {}
    exec(TINY_MODEL, namespace)  # the test's own model
    model = namespace["make"]()  # type: ignore[operator]
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "w.safetensors")
    rng = np.random.default_rng(1)
    for k in range(6):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{k}.png")
    (folder / "list.txt").write_text("".join(f"{k}.png\n" for k in range(6)))
    return folder / "model.py", folder / "w.safetensors", folder / "list.txt"


def tiny_run(model: Path, weights: Path, data: Path, out: Path, *extra: str) -> int:
    """``finercam run`` of :func:`tiny_model` into ``out`` in chunks of 4; ``extra`` options come last (and win)."""
    return dataset_cli("run", "--model", f"python:{model}:make", "--weights", weights, "--data", data, "--out", out,
                       "--preprocess", "none", "--layer", "0", "--chunk-size", "4", "--batch-size", "4",
                       "--workers", "0", "--quiet", *extra)
