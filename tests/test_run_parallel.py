"""CPU data parallelism of ``finercam run``: forked workers give exactly the one-process store; failures in a
worker surface in the parent as one clear error and never leave a worker behind."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from finercam.dataset import RunSettings, load_store, open_source, run_dataset
from finercam.dataset.parallel import WorkerError, default_processes, fork_available, forked_map, memory_fit
from finercam.dataset.settings import resolve_processes
from finercam.errors import InvalidArgumentError
from finercam.runtime import cpu_threads
from run_data import EMBEDDED_PREPROCESS, assert_same_store, cnn, synthetic_tree, write_bad_files

pytestmark = pytest.mark.skipif(not fork_available(), reason="worker processes are forked (Linux only)")


def _square(value: int) -> tuple[int, int, int]:
    return value, value * value, torch.get_num_threads()


def _fail_on_three(value: int) -> int:
    if value == 3:
        raise ValueError("task three is bad")
    return value


def _die_on_two(value: int) -> int:
    if value == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.05)
    return value


def _allocate_and_wait(value: int) -> tuple[int, int]:
    """Touch 64 MiB, then wait a little: the worker's peak memory grows by about that much on its first task."""
    block = torch.ones(64 * 2**20 // 4)
    block += 1
    del block
    time.sleep(0.02)
    return value, os.getpid()


def _no_workers_left() -> bool:
    deadline = time.monotonic() + 5
    while multiprocessing.active_children() and time.monotonic() < deadline:
        time.sleep(0.05)
    return not multiprocessing.active_children()


def test_forked_map_computes_every_task_once_with_one_thread_each() -> None:
    results = dict(forked_map(_square, list(range(20)), 3))
    assert sorted(results) == list(range(20))
    assert all(results[i] == (i, i * i, 1) for i in range(20))  # one torch thread per worker
    assert _no_workers_left()


def test_an_exception_in_a_worker_is_raised_in_the_parent_with_its_traceback() -> None:
    with pytest.raises(WorkerError, match=r"(?s)task 3.*Traceback.*ValueError: task three is bad"):
        list(forked_map(_fail_on_three, list(range(8)), 2))
    assert _no_workers_left()


def test_a_dead_worker_is_reported_not_waited_for() -> None:
    start = time.monotonic()
    with pytest.raises(WorkerError, match=r"died .*exit code -9"):
        list(forked_map(_die_on_two, list(range(40)), 2))
    assert time.monotonic() - start < 30
    assert _no_workers_left()


def test_stopping_early_terminates_the_workers() -> None:
    results = forked_map(_die_on_two, list(range(3, 400)), 2)
    next(results)
    results.close()
    assert _no_workers_left()


def test_process_settings() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert default_processes(cuda) == 1 and 1 <= default_processes(cpu) <= 32
    assert resolve_processes(RunSettings(), cpu) == default_processes(cpu)
    assert resolve_processes(RunSettings(num_workers=2), cpu) == 1  # the DataLoader layout was asked for
    assert resolve_processes(RunSettings(processes=3), cpu) == 3
    with pytest.raises(InvalidArgumentError, match="for models on the CPU"):
        resolve_processes(RunSettings(processes=2), cuda)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(InvalidArgumentError, match="processes must be an int"):
            RunSettings(processes=bad).check()  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="not both"):
        RunSettings(processes=2, num_workers=1).check()


def test_forked_workers_write_exactly_the_one_process_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Same batches, one thread each: bitwise the same tensors and records, bad files skipped the same way, and the
    model left exactly as found; the default process count (here 3 cores) is fitted to the memory, a given one not."""
    import finercam.dataset.parallel as parallel
    import finercam.dataset.pipeline as pipeline

    fitted: list[tuple[int, int]] = []

    def spy(wanted: int, log: object) -> object:
        return lambda growth: fitted.append((wanted, growth)) or wanted

    monkeypatch.setattr(parallel, "usable_cores", lambda: 3)
    monkeypatch.setattr(pipeline, "memory_fit", spy)
    tree = synthetic_tree(tmp_path / "data", 52, seed=13)
    write_bad_files(tree / cnn().class_names[1])
    source = open_source(tree, cnn().class_names)
    model = cnn().model
    state = {name: value.clone() for name, value in model.state_dict().items()}
    common = {"batch_size": 5, "chunk_size": 16, "gammas": (0.0, 0.6, 2.0), "progress": False, "max_pixels": 100_000}
    with cpu_threads(1):
        one = run_dataset(model, EMBEDDED_PREPROCESS, source, tmp_path / "one", RunSettings(processes=1, **common))
    forked = run_dataset(model, EMBEDDED_PREPROCESS, source, tmp_path / "forked", RunSettings(processes=3, **common))
    assert_same_store(load_store(tmp_path / "forked"), load_store(tmp_path / "one"))
    assert fitted == []  # --processes given: as many as asked
    run_dataset(model, EMBEDDED_PREPROCESS, source, tmp_path / "default", RunSettings(**common))
    assert_same_store(load_store(tmp_path / "default"), load_store(tmp_path / "one"))
    assert len(fitted) == 1 and fitted[0][0] == 3 and fitted[0][1] >= 0
    assert (forked.explained, forked.skipped) == (one.explained, one.skipped) and forked.skipped > 0
    assert not model.training and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(state[name], value) for name, value in model.state_dict().items())
    assert _no_workers_left()


_REUSED_MEMORY = """
import ctypes, sys, torch
from finercam.dataset.parallel import forked_map
libc = ctypes.CDLL("libc.so.6")
libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: large blocks come from the heap, which keeps them once freed
block = torch.ones(96 * 2**20 // 4); block += 1; del block  # 96 MiB resident in the parent's heap, free
def work(value):
    block = torch.ones(64 * 2**20 // 4); block += 1  # reuses the parent's free heap: no new resident page
    return value
growths = []
list(forked_map(work, list(range(6)), 3, fit=lambda growth: growths.append(growth) or 3))
print(growths[0])
"""


def test_a_worker_reusing_its_parents_freed_memory_still_counts_it() -> None:
    """Memory the parent freed stays resident in its heap; a worker writing it copies the pages, which its peak
    resident size does not show: the growth of its private memory does."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _REUSED_MEMORY], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    assert 48 * 2**20 <= int(done.stdout.split()[-1]) <= 256 * 2**20, done.stdout


def test_memory_fit_starts_only_the_workers_the_memory_holds() -> None:
    """Two workers start; the first result's growth of its worker's peak memory decides how many run in all."""
    growths: list[int] = []

    def fit(growth: int) -> int:
        growths.append(growth)
        return 3

    results = dict(forked_map(_allocate_and_wait, list(range(30)), 6, fit=fit))
    assert sorted(results) == list(range(30)) and len(growths) == 1
    assert 48 * 2**20 <= growths[0] <= 256 * 2**20, growths  # the 64 MiB block, measured in the worker
    assert len({pid for _, pid in results.values()}) == 3  # 2 at first, 1 more: not the 6 asked for
    assert _no_workers_left()

    notes: list[str] = []
    gib = 2**30
    assert memory_fit(8, notes.append, available=lambda: 4 * gib)(gib) == 5  # 2 started + 0.75 * 4 GiB / 1 GiB
    assert "grew by 1.00 GiB" in notes[0] and "5 worker processes instead of 8" in notes[0]
    assert memory_fit(8, notes.append, available=lambda: 100 * gib)(gib) == 8 and len(notes) == 1
    assert memory_fit(8, available=lambda: None)(gib) == 8  # unknown memory: as asked
    assert memory_fit(8, available=lambda: gib // 10)(gib) == 2  # never fewer than the two already running
