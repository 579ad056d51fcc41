"""The vectorised bird renderer: individuals (the class-independent random draws) and :func:`render`.

An individual fixes everything but the species: genus, position, scale, rotation, facing, pose, colours, lighting,
background, occluder and noise. :func:`render` paints a batch of individuals as any species of their genus, so
rendering the same individual as two sibling species changes only the pixels of the parts whose values differ.
Everything is computed on whole ``(N, H, W)`` tensors; the only Python loops run over parts and over the few
occluder candidates and distractors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from finercam.synth import scene
from finercam.synth.spec import (
    BACKGROUND,
    COARSE_PARTS,
    COLOUR_NAMES,
    COLOURS,
    GENERA,
    GEOMETRY,
    OCCLUDER,
    PARENT,
    PARTS,
    PLAIN,
    SynthArgumentError,
    SynthConfig,
    species_of,
)

_GEOMETRY = torch.tensor([genus.shape for genus in GENERA], dtype=torch.float32)
_FIELD = {name: i for i, name in enumerate(GEOMETRY)}
TAIL_ROOT_U, TAIL_INSIDE = -0.55, 0.45  # the tail starts inside the body, this far behind its centre
EYE_R, RING_WIDTH, BAR_HALF, CROWN_CUT = 0.12, 0.19, 0.13, 0.2  # body units; the crown is the head above -0.2 r
COLOUR_MIN, COLOUR_MAX = 0.08, 0.88  # bird colours stay here, so shading and noise never saturate a pixel


@dataclass(frozen=True)
class Individuals:
    """The class-independent random draws of ``N`` birds (every field has ``N`` rows); see :func:`render`.

    Attributes:
        genus: ``(N,)`` genus index; an individual can be rendered as any species of its genus.
        seed: ``(N,)`` per-image seed of the background texture and the pixel noise.
        centre: ``(N, 2)`` body centre ``(x, y)`` in pixels. scale: ``(N,)`` pixels per body unit.
        angle: ``(N,)`` rotation in radians. facing: ``(N,)`` ``+1`` beak to the right, ``-1`` to the left.
        head_shift: ``(N, 2)`` head offset (body units). tail_turn: ``(N,)`` extra tail droop in degrees.
        coarse_rgb: ``(N, 4, 3)`` colours of tail, body, wing and head. named_rgb: ``(N, 6, 3)`` this individual's
            shade of each named colour (the species picks which one a part wears).
        light: ``(N, 2)`` direction (radians) and strength of the shading gradient.
        backdrop: ``(N, 8)`` background colour, stripe amplitude, frequency, angle, phase.
        stripe_rgb: ``(N, 3)``. distractors: ``(N, D, 5)`` ellipses ``(x, y, a, b, angle)``; distractor_rgb
            ``(N, D, 3)``.
        occluders: ``(N, K, 6)`` candidates ``(kind, dx, dy, angle, a, b)`` (kind 0 a leaf, 1 a branch; offsets and
            sizes in body units); occluder_rgb ``(N, K, 3)``; occluded ``(N,)`` whether an occluder is drawn.
    """

    genus: Tensor
    seed: Tensor
    centre: Tensor
    scale: Tensor
    angle: Tensor
    facing: Tensor
    head_shift: Tensor
    tail_turn: Tensor
    coarse_rgb: Tensor
    named_rgb: Tensor
    light: Tensor
    backdrop: Tensor
    stripe_rgb: Tensor
    distractors: Tensor
    distractor_rgb: Tensor
    occluders: Tensor
    occluder_rgb: Tensor
    occluded: Tensor

    def __len__(self) -> int:
        return int(self.genus.shape[0])

    def __getitem__(self, index: Tensor | slice | int) -> Individuals:
        """The individuals selected by ``index`` along the first dimension."""
        index = [index] if isinstance(index, int) else index
        return Individuals(**{f.name: getattr(self, f.name)[index] for f in fields(self)})


def _uniform(generator: torch.Generator, low: float, high: float, *shape: int) -> Tensor:
    return low + (high - low) * torch.rand(*shape, generator=generator)


def _geometry(genus: Tensor) -> dict[str, Tensor]:
    table = _GEOMETRY[genus]
    return {name: table[:, i] for name, i in _FIELD.items()}


def _keypoints(geo: dict[str, Tensor], head_shift: Tensor, tail_turn: Tensor) -> Tensor:
    """``(N, 35, 2)`` points ``(u, v)`` on the outline of each bird, to fit it inside the image."""
    t = torch.linspace(0, 2 * math.pi, 17)[:-1]
    body = torch.stack([t.cos()[None].expand(len(tail_turn), -1), geo["body_b"][:, None] * t.sin()], 2)
    hu, hv, hr = geo["head_u"] + head_shift[:, 0], geo["head_v"] + head_shift[:, 1], geo["head_r"]
    s = t[::2]
    head = torch.stack([hu[:, None] + hr[:, None] * s.cos(), hv[:, None] + hr[:, None] * s.sin()], 2)
    bu, bv = hu + 0.7 * hr, hv + 0.15 * hr
    beak = torch.stack([torch.stack([bu + geo["beak_len"], bv], 1), torch.stack([bu, bv - geo["beak_half"]], 1),
                        torch.stack([bu, bv + geo["beak_half"]], 1)], 1)
    delta = torch.deg2rad(geo["tail_droop"] + tail_turn)
    length = TAIL_INSIDE + geo["tail_len"]
    end_u, end_v = TAIL_ROOT_U - length * delta.cos(), length * delta.sin()
    corners = [torch.stack([end_u + k * geo["tail_end"] * delta.sin(), end_v + k * geo["tail_end"] * delta.cos()], 1)
               for k in (-1.0, 1.0)]
    return torch.cat([body, head, beak, torch.stack(corners, 1)], 1)


def sample_individuals(genus: Tensor, generator: torch.Generator, config: SynthConfig) -> Individuals:
    """Draw one individual of each genus in ``genus``: pose, colours, lighting, background and occluder candidates.

    Every draw happens whatever the configuration's probabilities, so two configurations that differ only in e.g.
    ``occlusion`` give the same birds on the same backgrounds.
    """
    g, n, size = generator, len(genus), config.image_size
    seed = torch.randint(0, 2**62, (n,), generator=g)
    scale = _uniform(g, *config.scale, n) * size
    angle = torch.deg2rad(_uniform(g, -1.0, 1.0, n) * config.max_rotation)
    facing = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    head_shift, tail_turn = _uniform(g, -0.06, 0.06, n, 2), _uniform(g, -12.0, 12.0, n)

    base = torch.tensor([genus.body_rgb for genus in GENERA])[genus]
    shades = torch.tensor([genus.shades for genus in GENERA])[genus]
    body = (base + _uniform(g, -0.07, 0.07, n, 3)) * _uniform(g, 0.85, 1.1, n, 1)
    tail, wing, head = (body * shades[:, k, None] + _uniform(g, -0.03, 0.03, n, 3) for k in (2, 1, 0))
    coarse_rgb = torch.stack([tail, body, wing, head], 1).clamp(COLOUR_MIN, COLOUR_MAX)
    named = torch.tensor([COLOURS[name] for name in COLOUR_NAMES])
    named_rgb = (named + _uniform(g, -0.04, 0.04, n, len(named), 3)).clamp(COLOUR_MIN, COLOUR_MAX)
    light = torch.stack([_uniform(g, 0, 2 * math.pi, n), _uniform(g, 0.0, 0.06, n)], 1)

    backdrop = torch.cat([_uniform(g, 0.25, 0.75, n, 3), _uniform(g, 0.0, 0.12, n, 1), _uniform(g, 1.5, 5.0, n, 1),
                          _uniform(g, 0, math.pi, n, 1), _uniform(g, 0, 2 * math.pi, n, 1)], 1)
    stripe_rgb = _uniform(g, -1.0, 1.0, n, 3)
    d = config.distractors
    radius = _uniform(g, 0.025, 0.06, n, d) * size
    distractors = torch.stack([_uniform(g, 0, size, n, d), _uniform(g, 0, size, n, d), radius,
                               radius * _uniform(g, 0.35, 1.0, n, d), _uniform(g, 0, math.pi, n, d)], 2)
    pick = torch.randint(len(named), (n, d), generator=g)
    distractor_rgb = (named[pick] + _uniform(g, -0.05, 0.05, n, d, 3)).clamp(0, 1)
    occluders, occluder_rgb = scene.sample_occluders(n, g)
    occluded = torch.rand(n, generator=g) < config.occlusion

    # Place the bird so that all of it is inside the image (a 1 px margin), uniformly where there is room.
    geo = _geometry(genus)
    points = _keypoints(geo, head_shift, tail_turn)
    cos, sin = angle.cos()[:, None], angle.sin()[:, None]
    forward = facing[:, None] * points[..., 0]
    dx = scale[:, None] * (cos * forward - sin * points[..., 1])
    dy = scale[:, None] * (sin * forward + cos * points[..., 1])
    centre = []
    for offsets in (dx, dy):
        low, high = 1.0 - offsets.min(1).values, size - 1.0 - offsets.max(1).values
        high = torch.maximum(high, low)
        centre.append(low + torch.rand(n, generator=g) * (high - low))
    return Individuals(
        genus=genus.long(), seed=seed, centre=torch.stack(centre, 1), scale=scale, angle=angle, facing=facing,
        head_shift=head_shift, tail_turn=tail_turn, coarse_rgb=coarse_rgb, named_rgb=named_rgb, light=light,
        backdrop=backdrop, stripe_rgb=stripe_rgb, distractors=distractors, distractor_rgb=distractor_rgb,
        occluders=occluders, occluder_rgb=occluder_rgb, occluded=occluded,
    )


def bird_coordinates(ind: Individuals, size: int) -> tuple[Tensor, Tensor]:
    """``(N, H, W)`` body coordinates ``(u, v)`` of every pixel centre: ``u`` forward, ``v`` down, in body units."""
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    x = (coords[None, None, :] - ind.centre[:, 0, None, None]) / ind.scale[:, None, None]
    y = (coords[None, :, None] - ind.centre[:, 1, None, None]) / ind.scale[:, None, None]
    cos, sin = ind.angle.cos()[:, None, None], ind.angle.sin()[:, None, None]
    return ind.facing[:, None, None] * (cos * x + sin * y), cos * y - sin * x


def _regions(ind: Individuals, u: Tensor, v: Tensor) -> dict[str, Tensor]:
    """The ``(N, H, W)`` region of every part before any clipping or occlusion."""
    geo = {name: value[:, None, None] for name, value in _geometry(ind.genus).items()}
    hu, hv = geo["head_u"] + ind.head_shift[:, 0, None, None], geo["head_v"] + ind.head_shift[:, 1, None, None]
    hr = geo["head_r"]
    delta = torch.deg2rad(geo["tail_droop"] + ind.tail_turn[:, None, None])
    pu, pv = u - TAIL_ROOT_U, v
    along, across = -pu * delta.cos() + pv * delta.sin(), pu * delta.sin() + pv * delta.cos()
    length = TAIL_INSIDE + geo["tail_len"]
    half = geo["tail_root"] + (geo["tail_end"] - geo["tail_root"]) * along / length
    tail = (along >= 0) & (along <= length) & (across.abs() <= half)
    wing = ((u - geo["wing_u"]) / geo["wing_a"]) ** 2 + ((v - geo["wing_v"]) / geo["wing_b"]) ** 2 <= 1
    head = (u - hu) ** 2 + (v - hv) ** 2 <= hr**2
    eye2 = (u - hu - 0.35 * hr) ** 2 + (v - hv) ** 2
    ring = eye2 <= (EYE_R + RING_WIDTH) ** 2
    beak_along = (u - hu - 0.7 * hr) / geo["beak_len"]
    throat = ((u - geo["throat_u"]) / geo["throat_a"]) ** 2 + ((v - geo["throat_v"]) / geo["throat_b"]) ** 2 <= 1
    return {
        "tail": tail,
        "body": u**2 + (v / geo["body_b"]) ** 2 <= 1,
        "wing": wing,
        "head": head,
        "tailtip": tail & (along >= length - geo["tip_len"]),
        "throat": throat,
        "wingbar": wing & ((v - geo["wing_v"] - 0.2 * geo["wing_b"]).abs() <= BAR_HALF),
        "crown": head & (v - hv <= -CROWN_CUT * hr) & ~ring,
        "eyering": ring,
        "eye": eye2 <= EYE_R**2,
        "beak": (beak_along >= 0) & (beak_along <= 1)
        & ((v - hv - 0.15 * hr).abs() <= geo["beak_half"] * (1 - beak_along)),
    }


def part_map(ind: Individuals, size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Paint the parts back to front (no occluder yet).

    Returns:
        ``(N, H, W)`` long map (``0`` background, ``i + 1`` for ``PARTS[i]``) and the body coordinates ``u, v``.
        A small part is clipped to where its parent is visible, so every pixel belongs to exactly one part.
    """
    u, v = bird_coordinates(ind, size)
    regions = _regions(ind, u, v)
    layer = torch.full(u.shape, BACKGROUND, dtype=torch.long)
    for index, part in enumerate(PARTS, start=1):
        region = regions[part]
        if part in PARENT:
            region = region & (layer == PARTS.index(PARENT[part]) + 1) if part != "eye" else region & regions["head"]
        layer.masked_fill_(region, index)
    return layer, u, v


def per_image(values: Tensor | int, n: int, name: str) -> Tensor:
    """``values`` (one per image, or one for all) as an ``(n,)`` long tensor."""
    values = torch.as_tensor(values, dtype=torch.long)
    if values.dim() > 1 or (values.dim() == 1 and values.shape[0] != n):
        raise SynthArgumentError(f"{name} must be one class or one per image ({n}), got shape {tuple(values.shape)}")
    return values.expand(n)


def _bank_index(config: SynthConfig) -> Tensor:
    """``(C, P)``: for each class and part, which row of ``cat([coarse_rgb, named_rgb], 1)`` paints it."""
    rows = []
    for species in species_of(config):
        row = []
        for part in PARTS:
            value = species.values.get(part)
            if value is None or value == PLAIN:
                row.append(COARSE_PARTS.index(part if value is None else PARENT[part]))
            else:
                row.append(len(COARSE_PARTS) + COLOUR_NAMES.index(value))
        rows.append(row)
    return torch.tensor(rows)


def render(
    individuals: Individuals,
    labels: Tensor | int,
    config: SynthConfig,
    *,
    recolour: dict[str, tuple[float, float, float]] | None = None,
) -> tuple[Tensor, Tensor]:
    """Render each individual as the class in ``labels`` (one per individual, or one class for all).

    Args:
        individuals: from :func:`sample_individuals` with the same ``config``.
        labels: classes, each a species of its individual's genus.
        config: the configuration the individuals were drawn with.
        recolour: paint these parts in a fixed colour instead (for tests and what-if pictures).

    Returns:
        Images ``(N, 3, H, W)`` in ``[0, 1]`` and the visible part map ``(N, H, W)`` uint8: ``0`` background,
        ``i + 1`` part ``PARTS[i]``, :data:`OCCLUDER` where an occluder hides the bird or the background. The map does
        not depend on the species: a plain part's pixels are those where it would be visible.
    """
    ind, n, size = individuals, len(individuals), config.image_size
    labels = per_image(labels, n, "labels")
    classes = species_of(config)
    if n and (int(labels.min()) < 0 or int(labels.max()) >= len(classes)):
        raise SynthArgumentError(f"labels must be classes 0 to {len(classes) - 1}, got {labels.unique().tolist()}")
    genus_of = torch.tensor([c.genus_index for c in classes])
    if not torch.equal(genus_of[labels], ind.genus):
        raise SynthArgumentError("an individual can only be rendered as a species of its own genus")
    unknown = set(recolour or {}) - set(PARTS)
    if unknown:
        raise SynthArgumentError(f"recolour names unknown parts {sorted(unknown)}; parts are {list(PARTS)}")
    layer, u, v = part_map(ind, size)
    hidden, occluder_rgb = scene.occluder_mask(ind, layer, config)
    layer.masked_fill_(hidden, OCCLUDER)

    bank = torch.cat([ind.coarse_rgb, ind.named_rgb], 1)
    index = _bank_index(config)[labels]
    parts_rgb = bank.gather(1, index[..., None].expand(-1, -1, 3))
    for part, rgb in (recolour or {}).items():
        parts_rgb[:, PARTS.index(part)] = torch.tensor(rgb, dtype=torch.float32)
    palette = torch.cat([torch.zeros(n, 1, 3), parts_rgb, occluder_rgb[:, None]], 1)
    painted = palette.gather(1, layer.flatten(1)[..., None].expand(-1, -1, 3)).transpose(1, 2).view(n, 3, size, size)
    direction, strength = ind.light[:, 0, None, None], ind.light[:, 1, None, None]
    shade = (1 + strength * (direction.cos() * u + direction.sin() * v) / 2.5).clamp(0.94, 1.06)
    background, noise = scene.background_and_noise(ind, config)
    image = torch.where(layer[:, None] == BACKGROUND, background, painted * shade[:, None]) + noise
    return image.clamp_(0, 1), layer.to(torch.uint8)
