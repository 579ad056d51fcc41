"""The ``finercam run`` throughput benchmark stays runnable (its numbers are a report, never asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "run_throughput.py"


def test_run_benchmark_smoke(tmp_path: Path) -> None:
    completed = subprocess.run(
        [sys.executable, str(BENCHMARK), "--images", "48", "--rounds", "1", "--batch-size", "16", "--chunk-size", "16",
         "--workers", "1", "--json", str(tmp_path / "out.json")],
        capture_output=True, text=True, check=False, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "target: ratio <= 1.3" in completed.stdout
    (result,) = json.loads((tmp_path / "out.json").read_text())
    assert result["store_files"] == 3 + 2 and result["files_for_100k"] == 6252  # 100,000 / 16 chunks + 2
