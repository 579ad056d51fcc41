"""The ``finercam`` command line: ``finercam example`` (train a toy fine-grained classifier on the spot and explain it)
and ``finercam version``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

import finercam
from finercam.explain import DEFAULT_GAMMA
from finercam.methods import METHODS


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finercam", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    example = commands.add_parser(
        "example", help="train a toy fine-grained classifier (CPU, about 30 s) and explain it with Finer-CAM"
    )
    example.add_argument("--out", default="finercam-out", help="output folder (default: ./finercam-out)")
    example.add_argument("--seed", type=int, default=0)
    example.add_argument("--method", default="gradcam", choices=sorted(METHODS))
    example.add_argument("--gamma", type=float, default=DEFAULT_GAMMA)
    example.add_argument("--epochs", type=int, default=5)
    example.add_argument("--train-size", type=int, default=5000)
    example.add_argument("--test-size", type=int, default=1000)
    example.add_argument("--eval-size", type=int, default=100, help="test images scored by the pointing game")
    example.add_argument(
        "--dilation", type=int, default=1,
        help="also score with the difference mask grown by this many pixels (always: one cell of the map, 4 px)",
    )
    example.add_argument(
        "--num-references", type=int, default=1,
        help="T nearest reference classes (default 1: with 4 classes, T=3 would contrast with every other class, "
        "which for a linear head is nearly the baseline map)",
    )
    example.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    commands.add_parser("version", help="print the versions of finercam and torch")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``finercam`` console script; returns the exit status."""
    args = _parser().parse_args(argv)
    if args.command == "version":
        print(f"finercam {finercam.__version__} (torch {torch.__version__})")
        return 0
    from finercam.viz import MissingDependencyError

    try:
        from finercam.example import run_example

        return run_example(args)
    except MissingDependencyError as error:
        print(f"finercam: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
