"""One writer per output folder: ``exclusive(folder)`` holds a lock file there while a long job writes into it, so
that the same job started twice (another terminal, a scheduler retry) is refused instead of doing the work twice and
racing on the files. Locks are ``fcntl`` advisory locks: released by the kernel when the process ends, even killed,
so a crash never leaves a stale lock (only, at worst, an unlocked lock file); a job that ends removes the file.
Where ``fcntl`` is missing (Windows) nothing is locked."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from finercam.errors import InvalidArgumentError


@contextmanager
def exclusive(folder: Path, what: str, name: str = ".lock") -> Iterator[None]:
    """Hold ``folder/name`` for the body; ``what`` names the job in the refusal (``"finercam evaluate"``).

    Raises:
        InvalidArgumentError: another process holds the lock.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on Linux or macOS
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / name).open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InvalidArgumentError(
                f"another {what} is writing to {str(folder)!r}; wait for it to finish (then rerun to resume), or "
                "choose another --out"
            ) from None
        try:
            yield
        finally:  # the file goes with the lock, so a finished folder holds only its results
            (folder / name).unlink(missing_ok=True)
            fcntl.flock(handle, fcntl.LOCK_UN)
