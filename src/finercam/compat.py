"""Work-arounds for broken third-party installs; nothing here is needed on a healthy machine.

On machines where only a CUDA build of torchvision matches the installed CPU build of torch, ``import torchvision``
fails with ``RuntimeError: operator torchvision::nms does not exist`` because its compiled operators cannot load.
That breaks ``timm`` and every library importing them. :func:`import_torchvision` repairs exactly that case: it
registers the two missing operator schemas (never when the real operators loaded) and imports again. Models and
``transforms.v2`` then work; ``torchvision.ops.nms`` and ``torchvision.io`` decoding do not (read images with Pillow).
Importing this module (``import finercam`` does, first) applies the same repair in advance (:func:`repair_in_advance`)
when it sees that combination, so a plain ``import torchvision`` (or ``timm``, ``transformers``) after it works too.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import torch

_MISSING_OPERATOR_MESSAGE = "operator torchvision::nms does not exist"
_schema_library: torch.library.Library | None = None


def _define_missing_schemas() -> None:
    global _schema_library
    if _schema_library is not None:
        return
    library = torch.library.Library("torchvision", "FRAGMENT")
    library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    library.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
    _schema_library = library


def import_torchvision() -> ModuleType:
    """Import torchvision, repairing a CUDA build installed beside a CPU build of torch.

    Returns:
        The ``torchvision`` module.
    """
    try:
        import torchvision
    except RuntimeError as error:
        if _MISSING_OPERATOR_MESSAGE not in str(error):
            raise
        for name in [module for module in sys.modules if module.split(".")[0] == "torchvision"]:
            del sys.modules[name]
        _define_missing_schemas()
        import torchvision
    return torchvision


def _is_cuda_torchvision_beside_cpu_torch() -> bool:
    """Whether the installed torchvision is a CUDA build (``+cuXXX`` in its version file) while torch is a CPU build,
    read without importing torchvision."""
    if torch.version.cuda is not None:
        return False
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    version_file = Path(next(iter(spec.submodule_search_locations))) / "version.py"
    try:
        text = version_file.read_text()
    except OSError:
        return False
    return re.search(r"""^__version__\s*=\s*['"][^'"]*\+cu\d+""", text, re.MULTILINE) is not None


def repair_in_advance() -> None:
    """Register the missing operator schemas before torchvision is first imported, where torchvision is a CUDA build
    beside a CPU build of torch (its compiled operators cannot load there, so nothing is overridden); elsewhere, and
    once torchvision is imported, this does nothing."""
    if "torchvision" not in sys.modules and _is_cuda_torchvision_beside_cpu_torch():
        _define_missing_schemas()


repair_in_advance()
