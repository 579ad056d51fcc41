"""The models and variants that ``benchmarks/engine.py`` times (listed in its docstring): how each model is built
on random weights, and what one call of each variant runs."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch import Tensor, nn

import finercam
from finercam.compat import import_torchvision

tv = import_torchvision()  # before pytorch_grad_cam and torchcam, which import torchvision

VARIANTS = ("forward", "finercam", "sweep", "classes", "separate", "gradcam-lib", "torchcam-lib")
LIBRARY_VARIANTS = ("gradcam-lib", "torchcam-lib")
"""The other libraries' Finer-CAM, after which the parameters' ``.grad`` is dropped (grad-cam's ``backward()`` writes
it; torchcam 0.5 differentiates the layer's output only and writes none, so dropping is a no-op there)."""
SWEEP_GAMMAS = [0.0, 0.3, 0.6, 1.0, 2.0]
GAMMA = 0.6
NUM_REFERENCES = 3
CLASSES = 3
"""``classes``: ``cam.explain_classes(x, classes=3)``; ``separate``: the same three classes with three ``cam`` calls."""


@dataclass(frozen=True)
class ModelSpec:
    """How to build a model and explain it: its target layer and, for token layers, the token-to-grid reshapes."""

    build: Callable[[int], nn.Module]
    layer: str
    patch: int | None = None  # ViT patch size: the layer emits 1 + (size/patch)**2 tokens

    def finercam_reshape(self, size: int) -> Callable[[Tensor], Tensor] | None:
        if self.patch is None:
            return None
        grid = size // self.patch
        return finercam.TokenGrid(grid, grid, prefix_tokens=1)

    def gradcam_reshape(self, size: int) -> Callable[[Tensor], Tensor] | None:
        if self.patch is None:
            return None
        grid = size // self.patch

        def reshape_transform(tokens: Tensor) -> Tensor:  # the usual grad-cam ViT recipe, same as TokenGrid
            patches = tokens[:, 1:, :]
            return patches.reshape(tokens.size(0), grid, grid, tokens.size(2)).permute(0, 3, 1, 2)

        return reshape_transform


MODELS: dict[str, ModelSpec] = {
    "resnet18": ModelSpec(lambda size: tv.models.resnet18(weights=None), "layer4"),
    "resnet50": ModelSpec(lambda size: tv.models.resnet50(weights=None), "layer4"),
    "vit_b_16": ModelSpec(
        lambda size: tv.models.vit_b_16(weights=None, image_size=size),
        "encoder.layers.encoder_layer_11.ln_1",
        patch=16,
    ),
}


def build_model(name: str, size: int) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[name].build(size).eval()


def make_images(batch: int, size: int) -> Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(batch, 3, size, size, generator=generator)


def make_variant(name: str, variant: str, model: nn.Module, size: int) -> Callable[[Tensor], object]:
    """A callable running ``variant`` on a batch; it returns the result so that nothing is optimised away."""
    spec = MODELS[name]
    if variant == "forward":

        def forward(x: Tensor) -> object:
            with torch.inference_mode():
                return model(x)

        return forward
    if variant in ("finercam", "sweep", "classes", "separate"):
        cam = finercam.FinerCAM(model, spec.layer, "gradcam", reshape=spec.finercam_reshape(size))
        if variant == "finercam":
            return lambda x: cam(x, references="nearest", num_references=NUM_REFERENCES, gamma=GAMMA)
        if variant == "classes":
            return lambda x: cam.explain_classes(x, classes=CLASSES, num_references=NUM_REFERENCES, gamma=GAMMA)
        if variant == "separate":
            top: dict[int, Tensor] = {}  # the classes, known before timing: the separate calls get them for free

            def separate(x: Tensor) -> object:
                if id(x) not in top:
                    with torch.inference_mode():
                        top[id(x)] = model(x).topk(CLASSES, dim=1).indices
                return [cam(x, targets=top[id(x)][:, k], num_references=NUM_REFERENCES, gamma=GAMMA)
                        for k in range(CLASSES)]

            return separate
        return lambda x: cam.sweep(x, gammas=SWEEP_GAMMAS)
    if variant == "gradcam-lib":
        from pytorch_grad_cam import FinerCAM as LibFinerCAM
        from pytorch_grad_cam import GradCAM

        layer_module = model.get_submodule(spec.layer)
        reshape = spec.gradcam_reshape(size)

        def gradcam_lib(x: Tensor) -> object:
            # grad-cam keeps forward hooks on the layer for the object's lifetime; building it per call (cheap:
            # it registers two hooks) keeps them off the other variants, which share the model.
            with LibFinerCAM(model, [layer_module], reshape_transform=reshape, base_method=GradCAM) as lib:
                return lib(x, alpha=GAMMA)

        return gradcam_lib
    if variant == "torchcam-lib":
        from torchcam.methods import FinerCAM as TorchcamFinerCAM
        from torchcam.methods import GradCAM as TorchcamGradCAM

        reshape = spec.gradcam_reshape(size)
        extra = {"reshape_transform": reshape} if reshape is not None else {}

        def torchcam_lib(x: Tensor) -> object:
            # torchcam's recipe: a forward with its hooks on, then the extractor on the predicted classes (it picks
            # the nearest references itself); built per call for the same reason as grad-cam's.
            with TorchcamFinerCAM(model, spec.layer, input_shape=tuple(x.shape[1:]), base_method=TorchcamGradCAM,
                                  gamma=GAMMA, num_references=NUM_REFERENCES, **extra) as extractor:
                scores = model(x)
                return extractor(scores.argmax(dim=1).tolist(), scores)

        return torchcam_lib
    raise ValueError(f"unknown variant {variant!r}")


def clear_parameter_grads(model: nn.Module) -> None:
    """Drop the ``.grad`` that grad-cam's ``loss.backward()`` leaves on every parameter, so the other variants run
    with the same memory."""
    model.zero_grad(set_to_none=True)
