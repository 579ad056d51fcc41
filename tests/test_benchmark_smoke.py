"""The benchmark command stays runnable. Its numbers are a report, never asserted here (timings are noisy)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "engine.py"


def test_benchmark_quick_run_prints_the_table_and_a_verdict() -> None:
    completed = subprocess.run(
        [sys.executable, str(BENCHMARK), "--quick", "--no-memory"],
        capture_output=True, text=True, check=False, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    out = completed.stdout
    for variant in ("forward", "finercam", "sweep", "gradcam-lib"):
        assert f"| {variant} |" in out
    assert "TARGETS MET" in out or "TARGETS MISSED" in out
