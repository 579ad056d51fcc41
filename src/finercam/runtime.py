"""Process-wide torch settings that jobs change for their duration and always restore, and device names."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from finercam.errors import InvalidArgumentError


@contextmanager
def cpu_threads(count: int | None) -> Iterator[None]:
    """Run the body with ``count`` torch CPU threads (``0`` or ``None``: leave torch's choice), then restore."""
    previous = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def resolve_device(device: str | torch.device) -> torch.device:
    """A device that exists here: ``"auto"`` is CUDA when present, else the CPU; ``cuda[:N]`` must be available.

    Raises:
        InvalidArgumentError: not a device name, or a CUDA device this machine does not have.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise InvalidArgumentError(
            f"device {str(device)!r} is not a device; use auto, cpu, cuda or cuda:N"
        ) from None
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (resolved.index or 0) >= count:
            raise InvalidArgumentError(
                f"device {str(device)!r}: this machine has {count} CUDA device(s); use cpu (or auto)"
            )
    elif resolved.type == "meta":
        raise InvalidArgumentError(f"device {str(device)!r} holds no data, so nothing can be explained on it; "
                                   "use auto, cpu, cuda or cuda:N")
    elif resolved.type == "mps" and not torch.backends.mps.is_available():
        raise InvalidArgumentError(f"device {str(device)!r}: this machine has no MPS (Apple GPU) device; use cpu "
                                   "(or auto)")
    elif resolved.type != "cpu":
        try:
            torch.empty(1, device=resolved)
        except (RuntimeError, AssertionError) as error:  # a backend torch was not built with, or a missing device
            reason = str(error).strip().split("\n")[0][:200]
            raise InvalidArgumentError(
                f"device {str(device)!r} is not available here ({reason}); use auto, cpu, cuda or cuda:N"
            ) from None
    return resolved
