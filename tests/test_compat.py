"""``import finercam`` makes a later plain ``import torchvision`` (and timm) work where a CUDA build of torchvision sits
beside a CPU build of torch, as on the machines the README's setup builds; elsewhere it changes nothing."""

from __future__ import annotations

import subprocess
import sys

import torch

from finercam import compat


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)


def test_a_plain_torchvision_import_after_finercam_works() -> None:
    done = _python("import finercam, torchvision, timm; print(type(torchvision.models.resnet18()).__name__)")
    assert done.returncode == 0, done.stderr[-1500:]
    assert done.stdout.strip() == "ResNet"


def test_the_repair_is_made_only_for_a_cuda_torchvision_beside_a_cpu_torch() -> None:
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("torchvision")
    version = (Path(next(iter(spec.submodule_search_locations))) / "version.py").read_text() if spec else ""
    expected = torch.version.cuda is None and "+cu" in version.split("\n")[0]
    assert compat._is_cuda_torchvision_beside_cpu_torch() == expected
    broken = _python("import torchvision")  # without finercam: fails exactly where the repair is made
    assert (broken.returncode != 0) == expected, broken.stderr[-800:]
