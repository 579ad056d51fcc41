"""The tiny model and image of the metric tests: a linear model over the pixels of a 4 x 4 image, so that every
probability after masking can be written down by hand."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def softmax(logits: list[float]) -> list[float]:
    exps = [math.exp(v) for v in logits]
    return [e / sum(exps) for e in exps]


class PixelLinear(nn.Module):
    """Logits of a one-channel 4 x 4 image: class 0 sums pixels 0 and 1, class 1 is pixel 5, class 2 is zero."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(16, 3, bias=False)
        with torch.no_grad():
            self.linear.weight.zero_()
            self.linear.weight[0, 0] = self.linear.weight[0, 1] = 1.0
            self.linear.weight[1, 5] = 1.0
        self.calls: list[int] = []

    def forward(self, images: Tensor) -> Tensor:
        self.calls.append(int(images.shape[0]))
        return self.linear(images.flatten(1))


def pixel_case() -> tuple[PixelLinear, Tensor, Tensor]:
    images = torch.ones(1, 1, 4, 4)
    saliency = torch.zeros(1, 4, 4)
    saliency.view(-1)[0], saliency.view(-1)[1], saliency.view(-1)[5] = 1.0, 0.9, 0.8
    return PixelLinear().eval(), images, saliency
