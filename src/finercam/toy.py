"""A tiny procedural fine-grained dataset and a small CNN trained on the spot: a real example with no download.

Every image shows a "bird" on a noisy textured background. All four classes share the same body (an ellipse with a
wing, a head and an eye, with random position, size, facing and colours); they differ **only** in two small parts:

* the beak: red or blue (about 1% of the image);
* the wing-bar: a pale stripe across the wing, present or absent (about 1-2% of the image).

Red and blue "berries" are scattered over the background as distractors, so the beak's colour alone is not enough:
the classifier must look at the beak. Because each image is rendered from an individual (its random draws) and a
class, the same individual can be rendered as a sibling class, and the pixels that change are exactly those of
:func:`difference_mask`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from finercam.metrics import top1_accuracy

IMAGE_SIZE = 64
CLASS_NAMES = ("red beak, plain wing", "red beak, barred wing", "blue beak, plain wing", "blue beak, barred wing")
PARTS = ("beak", "wingbar")
NUM_BERRIES = 3


def class_attributes(labels: Tensor | int) -> dict[str, Tensor]:
    """The part attributes of classes: ``beak`` (0 red, 1 blue) and ``wingbar`` (0 absent, 1 present)."""
    labels = torch.as_tensor(labels)
    return {"beak": labels // 2, "wingbar": labels % 2}


@dataclass(frozen=True)
class Individuals:
    """The class-independent random draws of ``N`` birds; :func:`render` turns them into images of any class.

    Attributes:
        centre: ``(N, 2)`` body centre ``(x, y)`` in pixels.
        axes: ``(N, 2)`` body semi-axes ``(a, b)``.
        facing: ``(N,)`` ``+1`` (beak to the right) or ``-1``.
        beak_length: ``(N,)`` beak length in pixels.
        body_rgb, beak_rgb, bar_rgb: ``(N, 3)`` colours (``beak_rgb`` is a ``(N, 2, 3)`` pair: red, blue).
        background: ``(N, 3, H, W)`` textured background.
        noise: ``(N, 3, H, W)`` pixel noise added last.
        berries: ``(N, NUM_BERRIES, 3)`` ``(x, y, radius)`` of the distractor berries.
        berry_rgb: ``(N, NUM_BERRIES, 3)`` their colours (red or blue at random).
    """

    centre: Tensor
    axes: Tensor
    facing: Tensor
    beak_length: Tensor
    body_rgb: Tensor
    beak_rgb: Tensor
    bar_rgb: Tensor
    background: Tensor
    noise: Tensor
    berries: Tensor
    berry_rgb: Tensor

    def __len__(self) -> int:
        return int(self.facing.shape[0])


class ToyDataset(NamedTuple):
    """Images ``(N, 3, 64, 64)`` in ``[0, 1]``, labels ``(N,)``, visible part masks ``{part: (N, 64, 64) bool}``."""

    images: Tensor
    labels: Tensor
    part_masks: dict[str, Tensor]
    individuals: Individuals


def _uniform(generator: torch.Generator, low: float, high: float, *shape: int) -> Tensor:
    return low + (high - low) * torch.rand(*shape, generator=generator)


def sample_individuals(n: int, generator: torch.Generator) -> Individuals:
    """Draw ``n`` birds: geometry, colours, background texture, berries and noise."""
    g, size = generator, IMAGE_SIZE
    a, b = _uniform(g, 11.0, 14.0, n), _uniform(g, 7.0, 9.0, n)
    beak_length = _uniform(g, 8.0, 10.0, n)
    facing = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    front = 0.8 * a + 0.45 * b + beak_length + 2.0  # how far the beak tip reaches forward of the centre
    back = a + 2.0
    t = torch.rand(n, generator=g)
    low = torch.where(facing > 0, back, front)
    high = torch.where(facing > 0, size - front, size - back)
    cx = low + t * (high - low)
    cy = _uniform(g, 0.0, 1.0, n) * (size - 2.5 * b - 6.0) + 1.4 * b + 3.0

    shade = _uniform(g, 0.35, 0.65, n)
    body_rgb = torch.stack([shade, shade * _uniform(g, 0.75, 0.95, n), shade * _uniform(g, 0.45, 0.75, n)], 1)
    red = torch.tensor([0.85, 0.15, 0.12]) + _uniform(g, -0.08, 0.08, n, 3)
    blue = torch.tensor([0.15, 0.30, 0.90]) + _uniform(g, -0.08, 0.08, n, 3)
    bar_rgb = torch.tensor([0.93, 0.90, 0.78]) + _uniform(g, -0.05, 0.05, n, 3)

    base = _uniform(g, 0.25, 0.75, n, 3, 1, 1)
    texture = F.interpolate(_uniform(g, -0.2, 0.2, n, 3, 8, 8), size=(size, size), mode="bilinear", align_corners=False)
    background = base + texture
    noise = 0.05 * torch.randn(n, 3, size, size, generator=g)

    berries = torch.stack(
        [_uniform(g, 3, size - 3, n, NUM_BERRIES), _uniform(g, 3, size - 3, n, NUM_BERRIES),
         _uniform(g, 2.5, 3.5, n, NUM_BERRIES)], dim=2
    )
    berry_is_red = (torch.rand(n, NUM_BERRIES, 1, generator=g) < 0.5).float()
    berry_rgb = berry_is_red * torch.tensor([0.85, 0.15, 0.12]) + (1 - berry_is_red) * torch.tensor([0.15, 0.3, 0.9])
    berry_rgb = berry_rgb + _uniform(g, -0.08, 0.08, n, NUM_BERRIES, 3)
    return Individuals(
        centre=torch.stack([cx, cy], 1), axes=torch.stack([a, b], 1), facing=facing, beak_length=beak_length,
        body_rgb=body_rgb, beak_rgb=torch.stack([red, blue], 1), bar_rgb=bar_rgb, background=background,
        noise=noise, berries=berries, berry_rgb=berry_rgb,
    )


def _regions(ind: Individuals) -> dict[str, Tensor]:
    """Boolean regions ``(N, H, W)`` of each shape, before occlusion, in bird-centred coordinates."""
    coords = torch.arange(IMAGE_SIZE, dtype=torch.float32) + 0.5
    y, x = coords[None, :, None], coords[None, None, :]
    cx, cy = ind.centre[:, 0, None, None], ind.centre[:, 1, None, None]
    a, b = ind.axes[:, 0, None, None], ind.axes[:, 1, None, None]
    u, v = ind.facing[:, None, None] * (x - cx), y - cy  # u points forward, towards the beak
    hx, hy, r = 0.8 * a, -0.75 * b, 0.55 * b
    wing = ((u + 0.15 * a) / (0.55 * a)) ** 2 + ((v - 0.1 * b) / (0.5 * b)) ** 2 <= 1
    u0, length, half = hx + 0.8 * r, ind.beak_length[:, None, None], 4.0
    along = (u - u0) / length
    return {
        "body": (u / a) ** 2 + (v / b) ** 2 <= 1,
        "wing": wing,
        "wingbar": wing & ((v - 0.15 * b).abs() <= 2.0),
        "head": (u - hx) ** 2 + (v - hy) ** 2 <= r**2,
        "eye": (u - hx - 0.3 * r) ** 2 + (v - hy + 0.2 * r) ** 2 <= 1.3**2,
        "beak": (along >= 0) & (along <= 1) & ((v - hy).abs() <= half * (1 - along)),
    }


def render(individuals: Individuals, labels: Tensor | int) -> tuple[Tensor, dict[str, Tensor]]:
    """Render each individual as the class in ``labels`` (one per individual, or one class for all).

    Returns:
        Images ``(N, 3, H, W)`` in ``[0, 1]`` and the visible masks ``{part: (N, H, W) bool}`` of the parts. A part's
        mask is where it is (or, when absent, would be) visible, whatever the class.
    """
    ind, labels = individuals, torch.as_tensor(labels).expand(len(individuals))
    n, regions, attributes = len(ind), _regions(ind), class_attributes(labels)
    coords = torch.arange(IMAGE_SIZE, dtype=torch.float32) + 0.5
    # Paint shapes back to front as indices into a per-image palette; index 0 is the background.
    berries = [
        (coords[None, None, :] - ind.berries[:, k, 0, None, None]) ** 2
        + (coords[None, :, None] - ind.berries[:, k, 1, None, None]) ** 2
        <= ind.berries[:, k, 2, None, None] ** 2
        for k in range(NUM_BERRIES)
    ]
    bar = regions["wingbar"] & (attributes["wingbar"] == 1)[:, None, None]
    shapes = [*berries, regions["body"], regions["wing"], bar, regions["head"], regions["eye"], regions["beak"]]
    layer = torch.zeros(n, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.long)
    for index, shape in enumerate(shapes, start=1):
        layer.masked_fill_(shape, index)
    body = ind.body_rgb[:, None]
    palette = torch.cat(
        [torch.zeros(n, 1, 3), ind.berry_rgb, body, 0.75 * body, ind.bar_rgb[:, None], 0.9 * body, 0 * body,
         ind.beak_rgb[torch.arange(n), attributes["beak"]][:, None]], dim=1
    )
    painted = palette.flatten(0, 1)[layer + palette.shape[1] * torch.arange(n)[:, None, None]].permute(0, 3, 1, 2)
    image = torch.where(layer[:, None] == 0, ind.background, painted)
    occluders = regions["head"] | regions["eye"] | regions["beak"]
    masks = {"beak": regions["beak"], "wingbar": regions["wingbar"] & ~occluders}
    return (image + ind.noise).clamp_(0, 1), masks


def make_toy_dataset(n: int, seed: int = 0) -> ToyDataset:
    """``n`` images with uniformly drawn labels, deterministic from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    individuals = sample_individuals(n, generator)
    labels = torch.randint(len(CLASS_NAMES), (n,), generator=generator)
    images, masks = render(individuals, labels)
    return ToyDataset(images, labels, masks, individuals)


def difference_mask(part_masks: dict[str, Tensor], class_a: Tensor | int, class_b: Tensor | int) -> Tensor:
    """``(N, H, W)`` union of the parts whose attribute differs between ``class_a`` and ``class_b`` (per image)."""
    first, second = class_attributes(class_a), class_attributes(class_b)
    reference = next(iter(part_masks.values()))
    union = torch.zeros_like(reference, dtype=torch.bool)
    for part in PARTS:
        differs = torch.as_tensor(first[part] != second[part]).expand(reference.shape[0])
        union |= part_masks[part] & differs[:, None, None]
    return union


def _block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class ToyNet(nn.Module):
    """A small CNN (about 61k parameters): four conv blocks, global average pooling and a linear head.

    Explain ``block4`` (16x16 maps) with :class:`finercam.FinerCAM`.
    """

    def __init__(self, num_classes: int = len(CLASS_NAMES)) -> None:
        super().__init__()
        self.block1 = _block(3, 16, stride=2)
        self.block2 = _block(16, 32)
        self.pool = nn.MaxPool2d(2)
        self.block3 = _block(32, 64)
        self.block4 = _block(64, 64)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, images: Tensor) -> Tensor:
        x = self.pool(self.block2(self.block1(images - 0.5)))
        x = self.block4(self.block3(x))
        return self.fc(x.mean(dim=(2, 3)))


def train_toy_model(
    seed: int = 0,
    *,
    train_size: int = 5000,
    epochs: int = 5,
    batch_size: int = 64,
    lr: float = 3e-3,
    test: ToyDataset | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[ToyNet, float]:
    """Train :class:`ToyNet` on a fresh toy dataset, deterministically from ``seed`` (on CPU).

    Args:
        seed: seeds the training set, the initialisation and the shuffling.
        train_size: number of training images.
        epochs: passes over the training set (one-cycle learning-rate schedule).
        test: the test set to report accuracy on; by default ``make_toy_dataset(1000, seed + 1)``.
        log: called with progress lines, e.g. ``print``.

    Returns:
        The trained model (in eval mode) and its test accuracy.
    """
    say = log or (lambda _line: None)
    start = time.perf_counter()
    train = make_toy_dataset(train_size, seed)
    test = test if test is not None else make_toy_dataset(1000, seed + 1)
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ToyNet()
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * -(-train_size // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=lr, total_steps=max(steps, 1))
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(train_size, generator=generator)
        total = 0.0
        for i in range(0, train_size, batch_size):
            index = order[i : i + batch_size]
            loss = F.cross_entropy(model(train.images[index]), train.labels[index])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            total += loss.detach().item() * len(index)
        say(
            f"epoch {epoch + 1}/{epochs}: loss {total / train_size:.3f}, "
            f"test accuracy {top1_accuracy(model, test.images, test.labels):.1%} ({time.perf_counter() - start:.0f} s)"
        )
    model.eval()
    return model, top1_accuracy(model, test.images, test.labels)
