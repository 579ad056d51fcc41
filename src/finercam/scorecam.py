r"""Score-CAM without gradients: each activation channel, upsampled to the input size and min-max normalised, masks
the input; the explained score of every masked input gives that channel's weight after a softmax over channels.

For Finer-CAM the explained score is ``s(\gamma) = u - \gamma v`` (:func:`finercam.objectives.contrast_terms`)
evaluated on the masked input's logits with the image's own target and references. Since it is affine in ``\gamma``,
one set of masked forwards serves every ``\gamma`` and the baseline (``y_c``). Paper Eq. 9 adds a constant baseline
term to the scores; the softmax cancels it, so it is omitted.

Masked inputs of all images and channels are evaluated together in batches of ``batch_size``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from finercam.objectives import References, contrast_terms
from finercam.postprocess import minmax

CHANNEL_NORMALISATION_EPS = 1e-8


def channel_scores(
    forward: Callable[[Tensor], Tensor],
    images: Tensor,
    activation_maps: Tensor,
    objectives: Sequence[tuple[Tensor, References]],
    aggregation: str,
    batch_size: int,
    progress: Callable[[int, int], None] | None = None,
) -> Tensor:
    """Scores of every channel-masked input, for each objective, from one set of masked forwards.

    Args:
        forward: ``images -> logits`` (no hooks, no grad).
        images: ``(B, 3, H, W)``.
        activation_maps: ``A`` of shape ``(B, K, h, w)``.
        objectives: ``(targets, references)`` pairs: ``(B,)`` target classes and the images' reference classes.
        aggregation: see :func:`finercam.objectives.contrast_terms`.
        batch_size: masked inputs per forward pass.
        progress: optional callback ``(done, total)``.

    Returns:
        ``(N, 3, B, K)`` for ``N`` objectives: the terms ``u`` and ``v`` of the contrastive score and the target
        logit ``y_c``.
    """
    batch, channels = activation_maps.shape[:2]
    size = images.shape[-2:]
    total = batch * channels
    image_index = torch.arange(batch, device=images.device).repeat_interleave(channels)
    channel_index = torch.arange(channels, device=images.device).repeat(batch)
    scores = torch.empty(len(objectives), 3, total, dtype=activation_maps.dtype, device=activation_maps.device)
    with torch.no_grad():
        for start in range(0, total, batch_size):
            rows = slice(start, min(start + batch_size, total))
            owners = image_index[rows]
            masks = activation_maps[owners, channel_index[rows]][:, None]
            masks = F.interpolate(masks, size=size, mode="bilinear", align_corners=False)
            masks = minmax(masks, CHANNEL_NORMALISATION_EPS)
            logits = forward(images[owners] * masks)
            for index, (targets, references) in enumerate(objectives):
                owner_references = References(references.indices[owners], references.strategy)
                u, v = contrast_terms(logits, targets[owners], owner_references, aggregation)
                scores[index, 0, rows] = u
                scores[index, 1, rows] = v
                scores[index, 2, rows] = logits.gather(1, targets[owners][:, None]).squeeze(1)
            if progress is not None:
                progress(rows.stop, total)
    return scores.reshape(len(objectives), 3, batch, channels)


def score_cam_maps(activation_maps: Tensor, channel_score: Tensor) -> Tensor:
    r"""Raw Score-CAM maps ``\sum_k \mathrm{softmax}_k(S_k) A_k`` for scores ``(..., B, K)``: ``(..., B, h, w)``."""
    weights = torch.softmax(channel_score, dim=-1)
    return torch.einsum("...bk,bkhw->...bhw", weights, activation_maps)
