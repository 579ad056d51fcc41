"""TorchScript models, which run no Python hooks: their layers are read from the scripted graph and must give the
same maps as the Python model, in any module structure, traced or scripted, frozen or not."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from finercam import FinerCAM
from finercam.autolayer import auto_layer


class _FunctionalTop(nn.Module):
    """A layer whose output feeds functional operations in the model's own forward."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2))
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.features(x)).mean((2, 3)))


def _randomise_batch_norm(model: nn.Module) -> nn.Module:
    """Non-trivial running statistics, so that a layer's output differs from what in-place ops make of it."""
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0, 1, generator=generator)
            module.running_var.uniform_(0.5, 2.0, generator=generator)
            module.bias.data.normal_(0, 1, generator=generator)
    return model


def _same_raw_maps(scripted: nn.Module, eager: nn.Module, layer: str, x: torch.Tensor, method: str = "gradcam") -> None:
    expected = FinerCAM(eager, layer, method)(x, gamma=0.6)
    result = FinerCAM(scripted, layer, method)(x, gamma=0.6)
    assert torch.equal(result.references, expected.references)
    scale = expected.raw_maps.abs().max()
    torch.testing.assert_close(result.raw_maps / scale, expected.raw_maps / scale, atol=1e-5, rtol=0)


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_torchscript_layers_in_any_structure(tiny_net: nn.Module, resnet18: nn.Module) -> None:
    x = torch.randn(2, 3, 32, 32)
    sequential = nn.Sequential(*tiny_net.features, *tiny_net.head).eval()
    for layer in ("1", "3", "5"):  # top-level children of a scripted Sequential, plain forward
        _same_raw_maps(torch.jit.script(sequential), sequential, layer, x)
    assert auto_layer(torch.jit.script(sequential), (32, 32)) == auto_layer(sequential, (32, 32))
    functional = _FunctionalTop().eval()
    for layer in ("features", "features.0", "features.2"):
        _same_raw_maps(torch.jit.script(functional), functional, layer, x)
    _randomise_batch_norm(resnet18)
    x = torch.randn(2, 3, 64, 64)
    traced = torch.jit.trace(resnet18, x)
    for layer in ("layer4", "layer4.1.bn2", "layer3.1.bn2"):  # bn2 is followed by `out += identity` and relu_
        _same_raw_maps(traced, resnet18, layer, x)
        _same_raw_maps(torch.jit.script(resnet18), resnet18, layer, x, "layercam")
    assert auto_layer(traced, (64, 64)) == "layer4"


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_torchscript_frozen_backbone_with_a_trainable_head(resnet18: nn.Module) -> None:
    resnet18.requires_grad_(False)
    resnet18.fc.requires_grad_(True)  # the paper's set-up: a linear probe on a frozen backbone
    x = torch.randn(2, 3, 64, 64)
    _same_raw_maps(torch.jit.script(resnet18), resnet18, "layer4", x)


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
@pytest.mark.parametrize("frozen", [False, True])
def test_torchscript_models_give_the_python_models_maps(resnet18: nn.Module, frozen: bool) -> None:
    """No hooks run inside TorchScript: the layer output is read from the graph, with the same maps as Python."""
    resnet18.requires_grad_(not frozen)
    scripted = torch.jit.script(resnet18)
    x = torch.randn(2, 3, 64, 64)
    assert auto_layer(scripted, (64, 64)) == auto_layer(resnet18, (64, 64)) == "layer4"
    for method in ("gradcam", "layercam", "scorecam"):
        expected = FinerCAM(resnet18, "layer4", method)(x, gamma=0.6)
        result = FinerCAM(scripted, method=method)(x, gamma=0.6)
        assert torch.equal(result.references, expected.references)
        scale = expected.raw_maps.abs().max()
        torch.testing.assert_close(result.raw_maps / scale, expected.raw_maps / scale, atol=1e-5, rtol=0)
    assert all(p.grad is None for p in scripted.parameters())
    assert all(p.requires_grad is not frozen for p in scripted.parameters())
