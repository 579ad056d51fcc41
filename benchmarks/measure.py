"""Measuring on a shared, noisy machine: timings that know whether other processes took CPU meanwhile, and peak
memory of a code region read from ``/proc`` (Linux). Used by the benchmark scripts in this folder."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor


@dataclass(frozen=True)
class Sample:
    """One timed call: wall time, and the CPU that other processes (and the hypervisor) took meanwhile."""

    ms: float
    foreign_cores: float | None  # None where it cannot be judged (no /proc, or a call shorter than 10 ticks)


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _cpu_ticks() -> tuple[int, int] | None:
    """(busy ticks of the whole machine incl. steal, ticks of this process and of its reaped children, such as
    worker processes joined inside the timed call), or None without /proc."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:9]]
        own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return user + nice + system + irq + softirq + steal, sum(int(v) for v in own[11:15])


def timed(call: Callable[[Tensor], object], images: Tensor) -> Sample:
    """Time ``call(images)`` and how many cores other processes took meanwhile."""
    before = _cpu_ticks()
    start = time.perf_counter()
    result = call(images)
    elapsed = time.perf_counter() - start
    after = _cpu_ticks()
    del result
    foreign = None
    if before is not None and after is not None and elapsed * _CLOCK_TICKS >= 10:
        foreign_ticks = (after[0] - before[0]) - (after[1] - before[1])
        foreign = max(0.0, foreign_ticks / _CLOCK_TICKS / elapsed)
    return Sample(elapsed * 1000.0, foreign)


def is_clean(sample: Sample, max_foreign: float) -> bool:
    """Whether other processes took at most ``max_foreign`` cores during the sample (unknown counts as clean)."""
    return sample.foreign_cores is None or sample.foreign_cores <= max_foreign


def status_kb(field: str) -> int | None:
    """A ``/proc/self/status`` field in kB (``VmRSS``, ``VmHWM``), or None where unavailable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (``VmHWM``) to its current RSS; False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True
