"""A ``finercam run`` killed with SIGKILL at random moments and resumed gives exactly the store of an uninterrupted
run: the same records and bitwise the same tensors, no corrupt or left-over file."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from finercam.dataset import load_store
from finercam.dataset.store import CHUNKS, chunk_files
from run_data import assert_same_store, cnn, synthetic_tree, write_bad_files

COUNT, CHUNK, BATCH = 144, 8, 4
KILLS = 4


LAYOUTS = {
    "one process, a decoding worker": ["--processes", "1", "--workers", "1", "--threads", "1"],
    "forked worker processes": ["--processes", "2"],
}


def _command(data: Path, out: Path, layout: list[str]) -> list[str]:
    return [
        sys.executable, "-m", "finercam", "run", "--model", "embedded:cnn", "--data", str(data),
        "--out", str(out), "--batch-size", str(BATCH), "--chunk-size", str(CHUNK), *layout,
        "--max-pixels", "100000", "--gammas", "0", "0.6", "2", "--quiet",
    ]


def _start(command: list[str]) -> subprocess.Popen[bytes]:
    environment = {**os.environ, "PYTHONHASHSEED": "0"}
    return subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True, env=environment
    )


def _kill_when(process: subprocess.Popen[bytes], out: Path, chunks: int, delay: float) -> bool:
    """Wait until ``chunks`` chunk files exist (or the run ends), wait ``delay`` s more, then SIGKILL the run and its
    decoding worker. Returns whether it was killed (False: it had finished)."""
    deadline = time.monotonic() + 120
    while process.poll() is None and len(chunk_files(out)) < chunks and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(delay)
    if process.poll() is not None:
        return False
    os.killpg(process.pid, signal.SIGKILL)  # the session this test started: the run and its workers
    process.wait()
    return True


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_sigkill_and_resume_give_the_uninterrupted_store(tmp_path: Path, layout: str) -> None:
    data = synthetic_tree(tmp_path / "data", COUNT, seed=21)
    write_bad_files(data / cnn().class_names[2])  # skipped files must be recorded identically too
    reference = subprocess.run(_command(data, tmp_path / "reference", LAYOUTS[layout]), capture_output=True,
                               check=False)
    assert reference.returncode == 0, reference.stderr.decode()[-2000:]

    generator = random.Random(6)
    out = tmp_path / "killed"
    total = len(chunk_files(tmp_path / "reference"))
    kills = 0
    for attempt in range(KILLS):
        process = _start(_command(data, out, LAYOUTS[layout]))
        done = len(chunk_files(out))
        target = min(total - 1, done + generator.randint(1, max(1, (total - done) // (KILLS - attempt))))
        if _kill_when(process, out, target, generator.uniform(0.0, 0.05)):
            kills += 1
            load_store(out)  # what is there after a kill -9 is always readable
        else:
            assert process.returncode == 0, process.stderr.read().decode()[-2000:]  # type: ignore[union-attr]
    assert kills >= 2
    final = subprocess.run(_command(data, out, LAYOUTS[layout]), capture_output=True, check=False)
    assert final.returncode == 0, final.stderr.decode()[-2000:]

    assert_same_store(load_store(out), load_store(tmp_path / "reference"))
    assert not [entry.name for entry in (out / CHUNKS).iterdir() if entry.name.startswith(".tmp")]
    assert sorted(chunk_files(out)) == sorted(chunk_files(tmp_path / "reference"))
