"""Running the command line in tests: in this process (``run_cli``) or in a child Python (``subprocess_env``)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest

from finercam.cli import main


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``finercam ARGV`` in this process: exit status (2 for an argparse refusal), stdout, stderr."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random-weights warnings of the tiny models, fallbacks of HF directories
        try:
            status = main(argv)
        except SystemExit as stop:  # argparse refuses a value while parsing, before any work
            status = int(stop.code or 0)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def subprocess_env() -> dict[str, str]:
    """The environment for a child Python that imports this checkout's finercam, single-threaded."""
    source = str(Path(__file__).resolve().parents[1] / "src")
    path = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), source) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
