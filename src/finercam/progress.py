"""A one-line progress report on stderr: images done, images/s (s/image when slower), elapsed time, time left (ETA)
and, for long batches, what the current one is doing."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


class Progress:
    """``done/total images  rate img/s  ETA m:ss``: redrawn in place on a terminal, a line every ``interval`` s
    otherwise (logs), and never when disabled."""

    def __init__(self, total: int, *, enabled: bool = True, stream: TextIO | None = None, interval: float = 10.0):
        self.total = total
        self.done = 0
        self.skipped = 0
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.interactive = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = 0.2 if self.interactive else interval
        self.start = time.perf_counter()
        self._last = self.start
        self._stage = ""
        self._note = ""

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    @property
    def rate(self) -> float:
        return self.done / self.elapsed if self.elapsed > 0 else 0.0

    def line(self) -> str:
        rate = self.rate
        eta = _duration((self.total - self.done) / rate) if rate > 0 else "?"
        skipped = f", {self.skipped} skipped" if self.skipped else ""
        elapsed = _duration(self.elapsed)
        speed = "? img/s" if rate == 0 else f"{rate:.1f} img/s" if rate >= 1 else f"{1 / rate:.1f} s/img"
        note = f"  ({self._note})" if self._note and self.done < self.total else ""
        return f"{self.done}/{self.total} images{skipped}  {speed}  elapsed {elapsed}  ETA {eta}{note}"

    def update(self, images: int, skipped: int = 0) -> None:
        self.done += images
        self.skipped += skipped
        self._show(final=self.done >= self.total)

    def begin(self, stage: str) -> None:
        """A new stage (``"batch 2/5"``): shown with the counts until the next, each :meth:`note` after it."""
        self._stage = stage
        self.note("starting")

    def note(self, text: str) -> None:
        """What the current stage is doing (``"layercam on 32 images"``), shown with the counts at the same pace (a
        batch of a slow evaluation can take minutes)."""
        self._note = f"{self._stage}: {text}" if self._stage else text
        self._show(final=False)

    def _show(self, final: bool) -> None:
        now = time.perf_counter()
        if self.enabled and (now - self._last >= self.interval or final):
            self._last = now
            end = "\r" if self.interactive and not final else "\n"
            clear = "\r\x1b[K" if self.interactive else ""
            print(clear + self.line(), end=end, file=self.stream, flush=True)
