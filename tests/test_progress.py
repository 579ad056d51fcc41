"""The progress line: counts, a speed that stays readable when an image takes seconds, and what a long batch does."""

from __future__ import annotations

import io

import pytest

from finercam import progress
from finercam.progress import Progress


def _clock(monkeypatch: pytest.MonkeyPatch, times: list[float]) -> None:
    moments = iter(times)
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(moments))


def test_slow_runs_show_seconds_per_image(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = io.StringIO()
    _clock(monkeypatch, [0.0, 86.0, 86.0, 86.0, 86.0])
    tracker = Progress(20, stream=stream, interval=0.0)
    tracker.update(2)
    assert stream.getvalue().splitlines()[-1].startswith("2/20 images  43.0 s/img  elapsed 1:26  ETA 12:54")


def test_fast_runs_show_images_per_second(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = io.StringIO()
    _clock(monkeypatch, [0.0, 2.0, 2.0, 2.0, 2.0])
    tracker = Progress(20, stream=stream, interval=0.0)
    tracker.update(10)
    assert "10/20 images  5.0 img/s" in stream.getvalue()


def test_a_note_says_what_the_batch_does_until_the_end(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = io.StringIO()
    _clock(monkeypatch, [0.0] + [30.0] * 20)
    tracker = Progress(4, stream=stream, interval=0.0)
    tracker.note("batch 1/2: layercam on 2 images")
    assert stream.getvalue().splitlines()[-1].endswith("(batch 1/2: layercam on 2 images)")
    assert stream.getvalue().startswith("0/4 images  ? img/s")
    tracker.update(4)
    assert "(batch" not in stream.getvalue().splitlines()[-1]  # the final line has counts only
