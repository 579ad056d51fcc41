"""Work-arounds for broken third-party installs; nothing here is needed on a healthy machine.

On machines where only a CUDA build of torchvision matches the installed CPU build of torch, ``import torchvision``
fails with ``RuntimeError: operator torchvision::nms does not exist`` because its compiled operators cannot load.
That breaks ``timm`` and every library importing them. :func:`import_torchvision` repairs exactly that case: it
registers the two missing operator schemas (never when the real operators loaded) and imports again. Models and
``transforms.v2`` then work; ``torchvision.ops.nms`` and ``torchvision.io`` decoding do not (read images with Pillow).
"""

from __future__ import annotations

import sys
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
