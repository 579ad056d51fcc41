"""Lazy imports of the optional model libraries, with an install hint when one is missing.

``timm``, ``open_clip`` and transformers' vision models import torchvision, which needs the repair in
:mod:`finercam.compat` on machines where a CUDA build of torchvision sits beside a CPU build of torch; every import
here applies it first. Nothing is imported until a loader needs it.
"""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

from finercam.compat import import_torchvision
from finercam.errors import MissingDependencyError

_EXTRAS = {
    "torchvision": "vision",
    "timm": "vision",
    "safetensors": "vision",
    "transformers": "hf",
    "open_clip": "clip",
}
_PIP_NAMES = {"open_clip": "open_clip_torch"}


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module`` (repairing torchvision first), or explain how to install it.

    Args:
        module: ``torchvision``, ``timm``, ``transformers``, ``open_clip`` or ``safetensors``.
        purpose: what needs it, for the message (e.g. ``"timm: model specs"``).

    Raises:
        MissingDependencyError: the package is not installed.
    """
    top = module.split(".")[0]
    try:
        if top in ("torchvision", "timm", "open_clip", "transformers"):
            import_torchvision()
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        if error.name is None or error.name.split(".")[0] not in (top, "torchvision"):
            raise
        missing = error.name.split(".")[0]
        extra = _EXTRAS.get(missing, "models")
        raise MissingDependencyError(
            f"{purpose} needs the {_PIP_NAMES.get(missing, missing)!r} package, which is not installed; "
            f"install it with: pip install 'finercam[{extra}]'"
        ) from None


@contextmanager
def quiet_loading() -> Iterator[None]:
    """Silence the progress bars and load reports transformers and open_clip print while building models."""
    transformers_logging = None
    if "transformers" in sys.modules:  # never import it just to silence it
        from transformers.utils import logging as transformers_logging
    previous_root = logging.getLogger().level
    previous_verbosity = None
    bars_enabled = True
    if transformers_logging is not None:
        previous_verbosity = transformers_logging.get_verbosity()
        bars_enabled = transformers_logging.is_progress_bar_enabled()
        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()
    logging.getLogger().setLevel(logging.ERROR)
    try:
        yield
    finally:
        logging.getLogger().setLevel(previous_root)
        if transformers_logging is not None and previous_verbosity is not None:
            transformers_logging.set_verbosity(previous_verbosity)
            if bars_enabled:
                transformers_logging.enable_progress_bar()
