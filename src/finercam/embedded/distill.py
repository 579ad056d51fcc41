"""Token distillation: teach a ViT's patch tokens a CNN teacher's spatial features (FitNets-style hints).

A ViT trained only on image labels mixes every token with every other through global attention, so the class evidence
in its last tokens ends up away from the parts that carry it (the exact CAM of the shipped supervised ViT's head
peaked on the distinguishing part less often than a random map). The paper's ViT, DINOv2, has local patch tokens from
self-supervised patch-level objectives at a scale no CPU can train. A cheap substitute: make each final patch token
predict the teacher's feature vector at the same place,

    L_distill = sum_{b,i} ||P z_{b,i} - f(x_b)_i||^2 / sum_{b,i} ||f(x_b)_i||^2     (over a batch),

where ``z_i`` are the student's final-normed patch tokens, ``f(x)_i`` the teacher's last spatial maps average-pooled
onto the student's token grid, and ``P`` a linear projection used only in training (not part of the shipped model).
The shipped ViT learns ``L_distill`` alone, then gets a linear probe of its frozen mean patch token as its head
(:mod:`finercam.embedded.train`, objective ``distill-probe``); added to the cross-entropy instead, it did not make
the maps local.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from finercam.embedded.architectures import SmallCNN, SmallViT


class TokenDistillation(nn.Module):
    """The distillation term of a :class:`SmallViT` student and a frozen :class:`SmallCNN` teacher.

    Args:
        teacher: the teacher; put in eval mode and frozen here (it is a copy the caller does not use elsewhere).
        student: the student, for its token width and prefix-token count.
    """

    def __init__(self, teacher: SmallCNN, student: SmallViT) -> None:
        super().__init__()
        self.teacher = teacher.eval().requires_grad_(False)
        self.prefix = student.num_prefix_tokens
        channels = teacher.fc.in_features
        self.project = nn.Linear(student.head.in_features, channels)

    def forward(self, images: Tensor, tokens: Tensor, grid: tuple[int, int]) -> Tensor:
        """The normalised squared error between ``P z_i`` and the teacher's pooled features at each of the
        ``grid[0] * grid[1]`` patch positions (``tokens``: the student's :meth:`SmallViT.encode` output)."""
        with torch.no_grad():
            maps = F.adaptive_avg_pool2d(self.teacher.encode(images), grid)
            target = maps.flatten(2).transpose(1, 2)
        predicted = self.project(tokens[:, self.prefix :])
        return F.mse_loss(predicted, target) / target.pow(2).mean().clamp_min(1e-12)
