"""The benchmark command stays runnable. Its numbers are a report, never asserted here (timings are noisy)."""

from __future__ import annotations

import json
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
    for variant in ("forward", "finercam", "sweep", "gradcam-lib", "torchcam-lib"):
        assert f"| {variant} |" in out
    assert "TARGETS MET" in out or "TARGETS MISSED" in out


def test_concepts_benchmark_scores_the_chosen_layer(tmp_path: Path) -> None:
    out = tmp_path / "concepts.json"
    completed = subprocess.run(
        [sys.executable, str(BENCHMARK.parent / "concepts_pointing.py"), "--size", "48", "--gammas", "1",
         "--layer", "stage3", "--threads", "1", "--json", str(out)],
        capture_output=True, text=True, check=False, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "gradcam at stage3" in completed.stdout
    numbers = json.loads(out.read_text())
    assert numbers["layer"] == "stage3"
    for kind in ("genus", "bird"):
        plain, contrast = numbers["summary"][kind]["plain"], numbers["summary"][kind]["gamma 1"]
        assert 0 <= plain["pointing"] <= 1 and 0 <= contrast["pointing"] <= 1
        assert contrast["ratio_to_plain"] == round(contrast["pointing"] / plain["pointing"], 3)
