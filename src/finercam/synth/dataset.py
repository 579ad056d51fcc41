"""The dataset API: :func:`generate` a :class:`SynthDataset`, its part masks and the difference masks of class pairs."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from finercam.synth.render import Individuals, per_image, render, sample_individuals
from finercam.synth.spec import OCCLUDER, PARTS, SynthArgumentError, SynthConfig, differing_parts, species_of

CHUNK = 256  # images rendered at once; the result does not depend on it


@dataclass(frozen=True)
class SynthDataset:
    """Images of synthetic birds with their labels and visible part masks.

    Attributes:
        images: ``(N, 3, H, W)`` float32 in ``[0, 1]``.
        labels: ``(N,)`` long class indices; class ``k`` is species ``k % S`` of genus ``k // S``.
        genus: ``(N,)`` long genus indices.
        part_map: ``(N, H, W)`` uint8: ``0`` background, ``i + 1`` where part ``PARTS[i]`` is visible,
            :data:`~finercam.synth.spec.OCCLUDER` where an occluder is. The parts partition the visible bird.
        config: the configuration the images were drawn with (it defines the classes).
        individuals: the random draws, to re-render the same birds as other species (``None`` when loaded from disk).
    """

    images: Tensor
    labels: Tensor
    genus: Tensor
    part_map: Tensor
    config: SynthConfig
    individuals: Individuals | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def class_names(self) -> list[str]:
        """The class names in label order (also the ImageFolder folder names)."""
        return [species.name for species in species_of(self.config)]

    @property
    def part_masks(self) -> dict[str, Tensor]:
        """``{part: (N, H, W) bool}`` visible mask of every part in :data:`~finercam.synth.spec.PARTS`."""
        return {part: self.part_map == index for index, part in enumerate(PARTS, start=1)}

    @property
    def object_mask(self) -> Tensor:
        """``(N, H, W)`` bool: the visible bird (the union of all part masks)."""
        return (self.part_map > 0) & (self.part_map < OCCLUDER)

    @property
    def occluder_mask(self) -> Tensor:
        """``(N, H, W)`` bool: the pixels covered by a foreground occluder."""
        return self.part_map == OCCLUDER

    def difference_mask(self, class_a: Tensor | int, class_b: Tensor | int) -> Tensor:
        """``(N, H, W)`` bool: the visible parts that differ between ``class_a`` and ``class_b`` (per image)."""
        return difference_mask(self.part_map, class_a, class_b, self.config)

    def subset(self, index: Tensor | slice) -> SynthDataset:
        """The images selected by ``index``."""
        individuals = None if self.individuals is None else self.individuals[index]
        return dataclasses.replace(self, images=self.images[index], labels=self.labels[index],
                                   genus=self.genus[index], part_map=self.part_map[index], individuals=individuals)


def resolve_config(config: SynthConfig | None = None, **overrides: object) -> SynthConfig:
    """``config`` (default :class:`SynthConfig`) with some fields replaced; unknown field names are an error."""
    config = config if config is not None else SynthConfig()
    names = {field.name for field in dataclasses.fields(SynthConfig)}
    unknown = set(overrides) - names
    if unknown:
        raise SynthArgumentError(f"unknown options {sorted(unknown)}; options are {sorted(names)}")
    return dataclasses.replace(config, **overrides) if overrides else config  # type: ignore[arg-type]


def generate(n: int, seed: int = 0, config: SynthConfig | None = None, **overrides: object) -> SynthDataset:
    """Draw ``n`` images, deterministically from ``seed``; the classes are balanced (they differ by at most one).

    Args:
        n: number of images.
        seed: the same seed and configuration give the same bytes.
        config: the configuration (default :class:`SynthConfig`).
        **overrides: fields of :class:`SynthConfig` to replace, e.g. ``image_size=96``.

    Returns:
        The dataset, with its individuals.
    """
    config = resolve_config(config, **overrides)
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise SynthArgumentError(f"n={n!r} is not allowed: expected an int >= 0")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise SynthArgumentError(f"seed={seed!r} is not allowed: expected an int")
    generator = torch.Generator().manual_seed(seed)
    labels = (torch.arange(n) % config.num_classes)[torch.randperm(n, generator=generator)]
    genus = labels // config.species_per_genus
    individuals = sample_individuals(genus, generator, config)
    images, maps = [], []
    for start in range(0, n, CHUNK):
        image, part_map = render(individuals[start : start + CHUNK], labels[start : start + CHUNK], config)
        images.append(image)
        maps.append(part_map)
    size = config.image_size
    return SynthDataset(
        images=torch.cat(images) if n else torch.zeros(0, 3, size, size),
        labels=labels, genus=genus,
        part_map=torch.cat(maps) if n else torch.zeros(0, size, size, dtype=torch.uint8),
        config=config, individuals=individuals,
    )


def class_attributes(label: int, config: SynthConfig | None = None) -> dict[str, str]:
    """The genus and the value of every small part and the eye of a class: a colour name or ``"plain"``."""
    config = config if config is not None else SynthConfig()
    classes = species_of(config)
    if not 0 <= int(label) < len(classes):
        raise SynthArgumentError(f"class {label} does not exist: expected 0 to {len(classes) - 1}")
    species = classes[int(label)]
    return {"genus": species.genus, **species.values}


@functools.lru_cache(maxsize=32)
def _difference_table(config: SynthConfig) -> Tensor:
    """``(C, C, OCCLUDER + 1)`` bool: whether each part-map value is a differing part of each class pair."""
    c = config.num_classes
    table = torch.zeros(c, c, OCCLUDER + 1, dtype=torch.bool)
    for a in range(c):
        for b in range(c):
            for part in differing_parts(config, a, b):
                table[a, b, PARTS.index(part) + 1] = True
    return table


def difference_mask(
    part_masks: Tensor | dict[str, Tensor],
    class_a: Tensor | int,
    class_b: Tensor | int,
    config: SynthConfig | None = None,
) -> Tensor:
    """The union of the visible parts whose appearance differs between ``class_a`` and ``class_b``, per image.

    Within a genus those are the small parts whose values differ; across genera every part differs (the shapes do),
    so the mask is the whole visible bird. Occluded pixels are never in the mask.

    Args:
        part_masks: a part map ``(N, H, W)`` (as :attr:`SynthDataset.part_map`) or ``{part: (N, H, W) bool}`` (as
            :attr:`SynthDataset.part_masks`; missing parts count as invisible).
        class_a, class_b: classes, one per image or one for all.
        config: the configuration that defines the classes (default :class:`SynthConfig`).

    Returns:
        ``(N, H, W)`` bool.
    """
    config = config if config is not None else SynthConfig()
    if isinstance(part_masks, dict):
        unknown = set(part_masks) - set(PARTS)
        if unknown:
            raise SynthArgumentError(f"unknown parts {sorted(unknown)}; parts are {list(PARTS)}")
        first = next(iter(part_masks.values()))
        layer = torch.zeros(first.shape, dtype=torch.long)
        for part, mask in part_masks.items():
            layer.masked_fill_(mask.bool(), PARTS.index(part) + 1)
    else:
        layer = part_masks.long()
    if layer.dim() != 3:
        raise SynthArgumentError(f"expected masks of shape (N, H, W), got {tuple(layer.shape)}")
    n = layer.shape[0]
    a, b = per_image(class_a, n, "class_a"), per_image(class_b, n, "class_b")
    for labels in (a, b):
        if n and (int(labels.min()) < 0 or int(labels.max()) >= config.num_classes):
            raise SynthArgumentError(f"classes must be 0 to {config.num_classes - 1}, got {labels.unique().tolist()}")
    differs = _difference_table(config)[a, b]  # (N, values)
    return differs.gather(1, layer.flatten(1)).view_as(layer)
