"""What surrounds the bird: cluttered textured backgrounds, distractor blobs, pixel noise and foreground occluders.

The background texture and the noise come from a per-image seed, so any subset of individuals renders exactly as it
does within the full batch. Occluders are chosen among a few candidates so that none hides too much of a part that
tells the species of its genus apart (:attr:`SynthConfig.min_visible`).
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from finercam.synth.spec import GENERA, OCCLUDER, PARTS, SynthConfig, discriminative_parts

if TYPE_CHECKING:
    from finercam.synth.render import Individuals

NUM_CANDIDATES = 4
LEAF_RGB, BRANCH_RGB = (0.26, 0.50, 0.20), (0.42, 0.30, 0.20)


def _uniform(generator: torch.Generator, low: float, high: float, *shape: int) -> Tensor:
    return low + (high - low) * torch.rand(*shape, generator=generator)


def sample_occluders(n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``(n, K, 6)`` occluder candidates ``(kind, dx, dy, angle, a, b)`` and their colours ``(n, K, 3)``.

    Kind 0 is a leaf (an ellipse with semi-axes ``a, b``), kind 1 a branch (a band of half-width ``b`` across the
    image). ``dx, dy`` offset the occluder from the bird's centre; offsets and sizes are in body units.
    """
    g, k = generator, NUM_CANDIDATES
    kind = (torch.rand(n, k, generator=g) < 0.4).float()
    half = torch.where(kind > 0, _uniform(g, 0.12, 0.22, n, k), _uniform(g, 0.25, 0.45, n, k))
    occluders = torch.stack([kind, _uniform(g, -1.2, 1.2, n, k), _uniform(g, -1.0, 1.0, n, k),
                             _uniform(g, 0, math.pi, n, k), _uniform(g, 0.6, 1.0, n, k), half], 2)
    base = torch.where(kind[..., None] > 0, torch.tensor(BRANCH_RGB), torch.tensor(LEAF_RGB))
    return occluders, (base + _uniform(g, -0.07, 0.07, n, k, 3)).clamp(0, 1)


def _ellipses(size: int, x: Tensor, y: Tensor, a: Tensor, b: Tensor, angle: Tensor) -> Tensor:
    """``(N, H, W)`` bool: inside the ellipse of centre ``(x, y)``, semi-axes ``a, b`` (pixels) rotated by ``angle``."""
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    dx, dy = coords[None, None, :] - x[:, None, None], coords[None, :, None] - y[:, None, None]
    cos, sin = angle.cos()[:, None, None], angle.sin()[:, None, None]
    along, across = cos * dx + sin * dy, cos * dy - sin * dx
    return (along / a[:, None, None]) ** 2 + (across / b[:, None, None]) ** 2 <= 1


@functools.lru_cache(maxsize=32)
def _discriminative_table(config: SynthConfig) -> Tensor:
    """``(G, OCCLUDER + 1)`` bool: which part-map values are parts that vary within each genus."""
    table = torch.zeros(len(GENERA), OCCLUDER + 1, dtype=torch.bool)
    for g in range(config.num_genera):
        for part in discriminative_parts(config, g):
            table[g, PARTS.index(part) + 1] = True
    return table


def occluder_mask(ind: Individuals, layer: Tensor, config: SynthConfig) -> tuple[Tensor, Tensor]:
    """Choose each image's occluder: the first candidate that leaves at least ``min_visible`` of every part that
    varies within the genus visible (none if no candidate does, or if the individual is not ``occluded``).

    Args:
        ind: the individuals.
        layer: ``(N, H, W)`` part map before occlusion.
        config: gives ``min_visible`` and the image size.

    Returns:
        ``(N, H, W)`` bool mask of the occluder and its colour ``(N, 3)``.
    """
    n, size, values = len(ind), config.image_size, OCCLUDER + 1
    offset = layer + values * torch.arange(n)[:, None, None]
    before = torch.bincount(offset.flatten(), minlength=n * values).view(n, values)
    needed = _discriminative_table(config)[ind.genus]
    chosen = torch.full((n,), -1, dtype=torch.long)
    hidden = torch.zeros(layer.shape, dtype=torch.bool)
    for k in range(NUM_CANDIDATES):
        kind, dx, dy, angle, a, b = ind.occluders[:, k].unbind(1)
        x, y = ind.centre[:, 0] + ind.scale * dx, ind.centre[:, 1] + ind.scale * dy
        length = torch.where(kind > 0, torch.full_like(a, 4.0 * size), ind.scale * a)
        mask = _ellipses(size, x, y, length, ind.scale * b, angle)  # a branch is a very long thin ellipse
        covered = torch.bincount(offset[mask], minlength=n * values).view(n, values)
        keeps = (before - covered) >= config.min_visible * before
        take = (chosen < 0) & ind.occluded & (keeps | ~needed).all(1)
        chosen = torch.where(take, k, chosen)
        hidden |= mask & take[:, None, None]
    rgb = ind.occluder_rgb[torch.arange(n), chosen.clamp(min=0)]
    return hidden, rgb


def background_and_noise(ind: Individuals, config: SynthConfig) -> tuple[Tensor, Tensor]:
    """``(N, 3, H, W)`` cluttered backgrounds (two scales of colour texture, stripes, distractor blobs) and the
    pixel noise, clipped at 3 sigma."""
    n, size = len(ind), config.image_size
    coarse, fine = torch.empty(n, 3, 6, 6), torch.empty(n, 3, 16, 16)
    noise = torch.empty(n, 3, size, size)
    generator = torch.Generator()
    for i, seed in enumerate(ind.seed.tolist()):  # per image, so that a subset renders exactly as in the batch
        generator.manual_seed(seed)
        coarse[i], fine[i] = torch.rand(3, 6, 6, generator=generator), torch.rand(3, 16, 16, generator=generator)
        noise[i] = torch.randn(3, size, size, generator=generator)
    texture = sum(
        scale * (F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=False) - 0.5)
        for scale, grid in ((0.45, coarse), (0.2, fine))
    )
    texture = 0.4 * texture + 0.6 * texture.mean(dim=1, keepdim=True)  # mostly luminance, some colour
    rgb, amplitude, frequency, angle, phase = ind.backdrop.split([3, 1, 1, 1, 1], dim=1)
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    along = angle.cos()[..., None] * coords[None, None, :] + angle.sin()[..., None] * coords[None, :, None]
    stripes = amplitude[..., None] * torch.sin(2 * math.pi * frequency[..., None] * along + phase[..., None])
    image = (rgb[..., None, None] + texture + stripes[:, None] * ind.stripe_rgb[..., None, None]).clamp(0.02, 0.98)
    for d in range(ind.distractors.shape[1]):
        x, y, a, b, angle = ind.distractors[:, d].unbind(1)
        blob = _ellipses(size, x, y, a, b, angle)
        image = torch.where(blob[:, None], ind.distractor_rgb[:, d, :, None, None], image)
    return image, config.noise * noise.clamp_(-3, 3)
