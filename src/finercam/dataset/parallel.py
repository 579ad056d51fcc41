"""Data parallelism on the CPU: the batches of a run shared among forked worker processes of one torch thread each.

On a CPU-only machine, one process with ``N`` torch threads decodes between its batches with one core while the
others wait (or, with ``DataLoader`` processes, oversubscribes the cores its threads spin on). ``P`` processes with
one thread each, every one decoding and explaining whole batches, keep every core busy with useful work: on 2 cores,
the same model-side speed, and the end-to-end time of the embedded CNN 1.27 x the model side instead of 1.49 x
(``benchmarks/run_throughput.py`` measures both layouts). The parent process only hands out batch numbers, receives
the results and writes the store.

Workers are **forked**, so the model, the listing and the explainer are inherited, not pickled (any model works, also
one that cannot be pickled). A forked child must not start OpenMP parallel regions: GNU OpenMP's thread pool does not
survive ``fork`` and a child that uses more than one torch thread can hang. So each worker runs with one thread, as
PyTorch's own ``DataLoader`` workers do.

**Memory.** Every worker holds its own batch's activations. With ``fit`` (the default of ``finercam run`` when
``--processes`` is not given), at most two workers start at once; the first result reports how much the worker's peak
resident memory grew on its batch, and ``fit`` decides from that how many workers run in all (see
:func:`memory_fit`), so that a large model on a many-core machine does not exhaust the memory.

Failures never hang the parent: an exception in a worker is sent back with its traceback and raised in the parent as
:class:`WorkerError`; a worker that dies (killed, out of memory) is noticed within a second; whenever the parent
stops (done, error, ``KeyboardInterrupt``, the consumer closing the generator) every worker is terminated.
"""

from __future__ import annotations

import copyreg
import ctypes
import io
import multiprocessing
import os
import pickle
import queue
import resource
import signal
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import numpy as np
import torch

from finercam.errors import FinerCAMError

Task = TypeVar("Task")
Result = TypeVar("Result")

MAX_PROCESSES = 32
_FIRST_WORKERS = 2
_POLL_SECONDS = 1.0
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_NUMPY_DTYPES = frozenset({
    torch.float64, torch.float32, torch.float16, torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8,
    torch.bool,
})


class WorkerError(FinerCAMError):
    """A worker process failed or died; the message holds its traceback or exit code."""


def fork_available() -> bool:
    """Whether worker processes can be forked (Linux; macOS and Windows spawn, which would pickle the model)."""
    return "fork" in multiprocessing.get_all_start_methods() and os.name == "posix" and os.uname().sysname == "Linux"


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity), or the CPU count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_processes(device: torch.device) -> int:
    """Worker processes for a model on ``device``: one per usable core (at most :data:`MAX_PROCESSES`) on the CPU
    where workers can be forked, else 1 (a GPU is fed by one process with ``DataLoader`` decoding workers)."""
    if device.type != "cpu" or not fork_available():
        return 1
    return max(1, min(MAX_PROCESSES, usable_cores()))


def _peak_rss_bytes() -> int:
    """This process's peak resident memory (``ru_maxrss``: KiB on Linux). A forked child starts from its own current
    resident size, so its growth is what its work allocated."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def available_memory_bytes() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` (what can be allocated without swapping), or ``None`` where unknown."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def memory_fit(
    wanted: int, log: Callable[[str], None] | None = None, share: float = 0.75,
    available: Callable[[], int | None] = available_memory_bytes,
) -> Callable[[int], int]:
    """A ``fit`` for :func:`forked_map`: given the growth ``g`` of a worker's peak memory on its first batch, the
    workers to run in all: ``wanted``, or fewer so that the ones not yet started need at most ``share`` of the
    available memory (never fewer than the two already started). ``log`` hears of a reduction."""

    def fit(growth: int) -> int:
        free = available()
        if free is None or growth <= 0:
            return wanted
        started = min(wanted, _FIRST_WORKERS)
        allowed = max(started, min(wanted, started + int(share * free) // growth))
        if allowed < wanted and log is not None:
            log(f"note: each worker process grew by {growth / 2**30:.2f} GiB on its first batch and "
                f"{free / 2**30:.1f} GiB are available: {allowed} worker processes instead of {wanted} "
                "(--processes N sets the count; a smaller --batch-size needs less memory)")
        return allowed

    return fit


def _tensor_from_numpy(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array)


def _reduce_tensor(tensor: torch.Tensor) -> tuple[Any, ...]:
    """Plain CPU tensors travel as NumPy arrays: pickling them is ~25 times cheaper than torch's own reduction, which
    serialises every storage through ``torch.save``. Other tensors take torch's way."""
    if tensor.device.type == "cpu" and not tensor.requires_grad and tensor.dtype in _NUMPY_DTYPES:
        return _tensor_from_numpy, (tensor.contiguous().numpy(),)
    return tensor.__reduce_ex__(pickle.HIGHEST_PROTOCOL)


def _dumps(result: Any) -> bytes:
    buffer = io.BytesIO()
    pickler = pickle.Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL)
    pickler.dispatch_table = {**copyreg.dispatch_table, torch.Tensor: _reduce_tensor}
    pickler.dump(result)
    return buffer.getvalue()


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (``prctl(PR_SET_PDEATHSIG)``), so that a run killed
    with ``kill -9`` leaves no orphaned workers behind; elsewhere the worker loop checks its parent instead."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _private_bytes() -> int | None:
    """Resident memory private to this process (``Private_Clean + Private_Dirty`` of ``/proc/self/smaps_rollup``),
    ``None`` where unknown. In a forked child it counts the pages the child wrote, also pages it shares with its
    parent and copied on write: memory the parent had freed and the child reuses, which its resident size does not
    show as growth."""
    try:
        with open("/proc/self/smaps_rollup") as rollup:
            fields = [line.split() for line in rollup if line.startswith(("Private_Clean:", "Private_Dirty:"))]
        return sum(int(field[1]) for field in fields) * 1024 if len(fields) == 2 else None
    except (OSError, ValueError, IndexError):
        return None


def _growth_since(peak: int, private: int | None) -> int:
    """How much memory this worker's work took since ``(peak, private)`` were read: the larger of the growth of its
    peak resident size (freshly mapped memory, also when freed again) and of its private memory (reused memory)."""
    now = _private_bytes()
    return max(_peak_rss_bytes() - peak, 0 if now is None or private is None else now - private)


def _worker(function: Callable[[Any], Any], tasks: Sequence[Any], todo: Any, done: Any, parent: int) -> None:
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it stops the workers
    torch.set_num_threads(1)
    peak, private = _peak_rss_bytes(), _private_bytes()
    while True:
        try:
            number = todo.get(timeout=_POLL_SECONDS)
        except queue.Empty:
            if os.getppid() != parent:  # the parent died before PR_SET_PDEATHSIG took effect
                return
            continue
        if number is None:
            return
        try:
            payload = _dumps(function(tasks[number]))
        except BaseException:
            done.put(("error", number, traceback.format_exc(), 0))
            return
        done.put(("ok", number, payload, _growth_since(peak, private)))


def forked_map(
    function: Callable[[Task], Result], tasks: Sequence[Task], processes: int,
    fit: Callable[[int], int] | None = None,
) -> Iterator[tuple[int, Result]]:
    """``(i, function(tasks[i]))`` for every task, computed by ``processes`` forked workers (one torch thread
    each), yielded in the order they finish.

    ``function`` and ``tasks`` are inherited by the workers, not pickled; each result is pickled back (keep results
    small: CPU tensors, numbers). With ``fit``, two workers start first, and ``fit(growth)`` (the first result's
    memory growth of its worker, in bytes: see :func:`_growth_since`) says how many run in all (see :func:`memory_fit`).

    Raises:
        WorkerError: a worker raised (the message has its traceback) or died.
    """
    if not fork_available():
        raise WorkerError("worker processes need fork (Linux); use one process")
    if not tasks:
        return
    context = multiprocessing.get_context("fork")
    todo, done = context.Queue(), context.Queue()
    count = max(1, min(processes, len(tasks)))
    for number in range(len(tasks)):
        todo.put(number)
    parent = os.getpid()
    workers: list[Any] = []

    def start(total: int) -> None:
        with warnings.catch_warnings():
            # Python >= 3.12 warns about forking a process that has threads (here torch's idle OpenMP pool); the
            # workers never use that pool (one thread each), which is what the warning is about
            warnings.filterwarnings("ignore", message=r".*fork\(\) may lead to deadlocks", category=DeprecationWarning)
            for k in range(len(workers), total):
                todo.put(None)  # after every task: one stop per worker
                worker = context.Process(target=_worker, args=(function, tasks, todo, done, parent), daemon=True,
                                         name=f"finercam-worker-{k}")
                worker.start()
                workers.append(worker)

    start(min(count, _FIRST_WORKERS) if fit is not None else count)
    try:
        for received in range(len(tasks)):
            kind, number, payload, growth = _next_result(done, workers)
            if kind == "error":
                raise WorkerError(f"a worker process failed on task {number}:\n{payload}")
            if received == 0 and fit is not None and count > len(workers):
                start(max(len(workers), min(count, fit(growth))))
            yield number, pickle.loads(payload)
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.terminate()
        for worker in workers:
            worker.join()
        for channel in (todo, done):
            channel.close()
            channel.cancel_join_thread()


def _next_result(done: Any, workers: list[Any]) -> tuple[str, int, Any, int]:
    while True:
        try:
            return done.get(timeout=_POLL_SECONDS)
        except queue.Empty:
            dead = [worker for worker in workers if worker.exitcode not in (None, 0)]
            if dead:
                codes = ", ".join(f"{worker.name}: exit code {worker.exitcode}" for worker in dead)
                raise WorkerError(
                    f"a worker process died ({codes}; a negative code is the signal, e.g. -9 when the system ran "
                    "out of memory); the finished chunks are kept, run again to resume, with fewer --processes if "
                    "memory is short"
                ) from None
