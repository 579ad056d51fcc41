"""Parity with the two reference libraries: ``grad-cam`` 1.5.7 (``FinerCAM`` + ``FinerWeightedTarget``, softmax
aggregation) and ``torchcam`` 0.5.0 (``FinerCAM``, mean aggregation), on a torchvision ResNet-18 and a timm ViT with
random weights. Random-init maps have tiny magnitudes, so raw maps are compared relative to their largest value.

Known, deliberate differences are documented where they occur: torchcam normalises at layer resolution and does not
upsample; torchcam's Grad-CAM++ never applies its alpha denominator
(``alpha[idx][mask].div_`` divides a boolean-indexed copy), so Grad-CAM++ is compared with grad-cam only.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pytorch_grad_cam import FinerCAM as GradCamFinerCAM
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, XGradCAM
from pytorch_grad_cam.utils.model_targets import FinerWeightedTarget
from torch import Tensor, nn
from torchcam import methods as torchcam_methods

from finercam import CAMResult, FinerCAM
from finercam.postprocess import normalize_maps

TOLERANCE = 1e-4
GAMMA = 0.6
GRAD_CAM_METHODS = {
    "gradcam": GradCAM,
    "hirescam": HiResCAM,
    "xgradcam": XGradCAM,
    "gradcam++": GradCAMPlusPlus,
    "layercam": LayerCAM,
}
TORCHCAM_METHODS = {"gradcam": torchcam_methods.GradCAM, "layercam": torchcam_methods.LayerCAM}


def _vit_grid(tokens: Tensor) -> Tensor:
    """The hand-written reshape users give grad-cam and torchcam for this ViT (1 CLS token, 4 x 4 patches)."""
    return tokens[:, 1:, :].reshape(tokens.shape[0], 4, 4, tokens.shape[2]).permute(0, 3, 1, 2)


def _setup(name: str, resnet18: nn.Module, timm_vit: nn.Module) -> tuple[nn.Module, str, object, Tensor]:
    torch.manual_seed(5)
    if name == "resnet18":
        return resnet18, "layer4", None, torch.randn(3, 3, 64, 64)
    return timm_vit, "blocks.1.norm1", _vit_grid, torch.randn(3, 3, 32, 32)


def _ours(
    name: str, method: str, aggregation: str, resnet18: nn.Module, timm_vit: nn.Module, gamma: float = GAMMA
) -> tuple[nn.Module, str, object, Tensor, CAMResult]:
    """The model, its layer, reshape and input, and finercam's explanation with 3 nearest references."""
    model, layer, reshape, x = _setup(name, resnet18, timm_vit)
    result = FinerCAM(model, layer, method, reshape=reshape)(  # type: ignore[arg-type]
        x, references="nearest", num_references=3, gamma=gamma, aggregation=aggregation
    )
    return model, layer, reshape, x, result


def _relative(actual: Tensor, expected: Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max().clamp(min=1e-30))


def _minmax(cam: Tensor) -> Tensor:
    cam = cam - cam.amin(dim=(1, 2), keepdim=True)
    return cam / (cam.amax(dim=(1, 2), keepdim=True) + 1e-7)


def _grad_cam_convention(raw: Tensor, size: tuple[int, int]) -> Tensor:
    """grad-cam's post-processing: ReLU, min-max at layer resolution, bilinear resize, min-max again (its
    ``aggregate_multi_layers``). Resizing commutes with the first min-max, so this equals our ``maps``."""
    cam = _minmax(raw.clamp(min=0))
    return _minmax(F.interpolate(cam[:, None], size=size, mode="bilinear", align_corners=False)[:, 0])


@pytest.mark.parametrize("model_name", ["resnet18", "vit"])
@pytest.mark.parametrize("method", sorted(GRAD_CAM_METHODS))
def test_parity_with_grad_cam_finer_cam(
    resnet18: nn.Module, timm_vit: nn.Module, model_name: str, method: str
) -> None:
    model, layer, reshape, x, ours = _ours(model_name, method, "softmax", resnet18, timm_vit)
    module = model.get_submodule(layer)
    oracle = GradCamFinerCAM(model, [module], reshape_transform=reshape, base_method=GRAD_CAM_METHODS[method])
    targets = [
        FinerWeightedTarget(int(c), [int(d) for d in refs], GAMMA)
        for c, refs in zip(ours.targets, ours.references, strict=True)
    ]
    oracle_maps = torch.from_numpy(oracle(x, targets=targets))
    # The oracle's raw (pre-ReLU) map from the activations and gradients it recorded.
    base = oracle.base_cam
    activations = base.activations_and_grads.activations[0].numpy()
    gradients = base.activations_and_grads.gradients[0].numpy()
    oracle_raw = torch.from_numpy(base.get_cam_image(x, module, targets, activations, gradients, False))
    oracle.base_cam.activations_and_grads.release()

    assert _relative(ours.raw_maps, oracle_raw) < TOLERANCE
    size = (x.shape[-2], x.shape[-1])
    torch.testing.assert_close(_grad_cam_convention(ours.raw_maps, size), oracle_maps, atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(ours.maps, normalize_maps(oracle_raw, size), atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(ours.maps, oracle_maps, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("model_name", ["resnet18", "vit"])
def test_grad_cam_default_references_are_our_nearest(resnet18: nn.Module, timm_vit: nn.Module, model_name: str) -> None:
    """End to end with grad-cam choosing its own (nearest, top-prediction) references."""
    model, layer, reshape, x, ours = _ours(model_name, "gradcam", "softmax", resnet18, timm_vit, gamma=1.0)
    oracle = GradCamFinerCAM(model, [model.get_submodule(layer)], reshape_transform=reshape)
    oracle_maps = torch.from_numpy(oracle(x, alpha=1.0))
    oracle.base_cam.activations_and_grads.release()
    torch.testing.assert_close(ours.maps, oracle_maps, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("model_name", ["resnet18", "vit"])
@pytest.mark.parametrize("method", sorted(TORCHCAM_METHODS))
def test_parity_with_torchcam_finer_cam(
    resnet18: nn.Module, timm_vit: nn.Module, model_name: str, method: str
) -> None:
    model, layer, reshape, x, ours = _ours(model_name, method, "mean", resnet18, timm_vit)
    input_shape = tuple(x.shape[1:])
    kwargs = {"reshape_transform": reshape} if reshape is not None else {}
    with torchcam_methods.FinerCAM(
        model, layer, input_shape=input_shape, base_method=TORCHCAM_METHODS[method], gamma=GAMMA,
        num_references=3, **kwargs,
    ) as extractor:
        scores = model(x)
        (oracle_relu,) = extractor(ours.targets.tolist(), scores, ours.references.tolist(), normalized=False)
        scores = model(x)
        (oracle_normalized,) = extractor(ours.targets.tolist(), scores, normalized=True)  # its own references
    assert _relative(ours.raw_maps.clamp(min=0), oracle_relu) < TOLERANCE
    relu = ours.raw_maps.clamp(min=0)
    low = relu.amin(dim=(1, 2), keepdim=True)
    ours_normalized = (relu - low) / ((relu - low).amax(dim=(1, 2), keepdim=True) + 1e-8)
    torch.testing.assert_close(ours_normalized, oracle_normalized, atol=TOLERANCE, rtol=0)


def test_torchcam_gradcam_plus_plus_skips_its_denominator(resnet18: nn.Module) -> None:
    """Documents why torchcam is not an oracle for Grad-CAM++: its weights equal sum(g^2 relu(g)), i.e. the
    alpha denominator is never applied, while ours (and grad-cam's) follow Eq. 19 of the Grad-CAM++ paper."""
    x = torch.randn(2, 3, 64, 64)
    with torchcam_methods.GradCAMpp(resnet18, "layer4", input_shape=(3, 64, 64)) as extractor:
        scores = resnet18(x)
        (theirs,) = extractor([1, 2], scores, normalized=False)
        activations, gradients = extractor.hook_a[0], extractor.hook_g[0]
    undivided = (gradients.pow(2) * gradients.clamp(min=0)).flatten(2).sum(-1)
    expected = torch.einsum("bk,bkhw->bhw", undivided, activations).clamp(min=0)
    assert _relative(theirs, expected) < 1e-5
    ours = FinerCAM(resnet18, "layer4", "gradcam++")(x, targets=[1, 2], gamma=0.0)
    assert _relative(ours.raw_maps.clamp(min=0), theirs) > 1e-2
    assert np.isfinite(ours.raw_maps.numpy()).all()
