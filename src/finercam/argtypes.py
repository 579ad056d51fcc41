"""Argument types of the command line: each parses a string or raises ``argparse.ArgumentTypeError`` naming the rule;
and the help texts of the options several commands share."""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from pathlib import Path


def whole_number(text: str, rule: str) -> int:
    """``text`` as an ``int``, or an error stating ``rule`` (what the option accepts) for text that is not one."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{rule}, got {text!r}") from None


def number(text: str, rule: str) -> float:
    """``text`` as a ``float``, or an error stating ``rule`` for text that is not a number."""
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{rule}, got {text!r}") from None


def positive_int(text: str) -> int:
    """A whole number >= 1."""
    value = whole_number(text, "must be a whole number >= 1")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text}")
    return value


def non_negative_int(text: str) -> int:
    """A whole number >= 0."""
    value = whole_number(text, "must be a whole number >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {text}")
    return value


MAX_SEED = 2**63 - 1


def seed(text: str) -> int:
    """A random seed: a whole number from 0 to 2**63 - 1 (torch's generators take 64 bits; a negative seed would be
    the same as a large one)."""
    value = whole_number(text, f"must be a whole number from 0 to {MAX_SEED}")
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be a whole number from 0 to {MAX_SEED}, got {text}")
    return value


def gamma(text: str) -> float:
    """A comparison strength: a finite number >= 0 (0 explains the target alone)."""
    rule = "must be a finite number >= 0 (0 is the base CAM)"
    value = number(text, rule)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{rule}, got {text}")
    return value


def finite_float(text: str) -> float:
    """A finite number (not NaN or infinite)."""
    value = number(text, "must be a finite number")
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def non_negative_float(text: str) -> float:
    """A finite number >= 0."""
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0."""
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _creatable(path: Path) -> None:
    """Raise unless the folders above ``path`` exist as folders or can be made, in a writable place."""
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise argparse.ArgumentTypeError(f"'{ancestor}' is a file, so '{path}' cannot be created under it")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"'{ancestor}' is not writable, so '{path}' cannot be created")


def output_dir(text: str) -> Path:
    """A folder to write into: an existing writable folder, or one that can be created (checked before any work)."""
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise argparse.ArgumentTypeError(f"'{path}' is a file; give a folder (it is created when missing)")
        if not os.access(path, os.W_OK | os.X_OK):
            raise argparse.ArgumentTypeError(f"the folder '{path}' is not writable")
        return path
    _creatable(path)
    return path


def output_file(*suffixes: str) -> Callable[[str], Path]:
    """An argument type for a file to write: not a folder, in a writable place, ending in one of ``suffixes``
    (case-insensitive; any suffix when none is given)."""

    def parse(text: str) -> Path:
        path = Path(text).expanduser()
        if path.is_dir():
            raise argparse.ArgumentTypeError(f"'{path}' is a folder; give a file name")
        if suffixes and path.suffix.lower() not in suffixes:
            raise argparse.ArgumentTypeError(f"'{path}' must end in one of {', '.join(suffixes)}")
        if path.exists():
            if not os.access(path, os.W_OK):
                raise argparse.ArgumentTypeError(f"the file '{path}' is not writable")
        else:
            _creatable(path)
        return path

    return parse


FIGURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".pdf", ".svg", ".webp")
"""What the figure writers (matplotlib, Pillow) accept."""


# Help texts of the model options, shared by the commands that load a classifier.
MODEL_HELP = (
    "torchvision:NAME, timm:NAME, hf:ID_OR_DIR, open_clip:ARCH, torchscript:PATH, python:FILE.py:FACTORY, or "
    "embedded:cnn / embedded:vit (the models shipped in the package)"
)
WEIGHTS_HELP = "weights file: safetensors, or a state dict (loaded with weights_only=True)"
HEAD_HELP = "a linear head (from train-probe, or an official Finer-CAM head file)"
PREPROCESS_HELP = (
    "preprocessing preset: imagenet, clip, dinov2, dinov2-official or none, optionally at another input size "
    "(imagenet@32, none@64x48); default: the model's own configuration"
)
