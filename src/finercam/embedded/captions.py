"""Captions of synthetic birds for the embedded CLIP: generated from each class's genus and part colours.

A caption names the genus (or just "bird", or nothing) and a random subset of the bird's *mentionable* attributes:
the beak colour (always visible) and the value of every part that tells the species of its genus apart (a colour,
or ``plain`` when the part wears its parent's colour)::

    a finch with a black beak and a white wingbar      finch      a bird with a plain throat      white eyering

so that single attributes ("black beak") and genus names ("finch") are in the training distribution. Every caption
carries its *requirements* (a genus, and a value per mentioned part): a caption is true of every class that meets
them ("black beak" is true of warblers and jays too), which the contrastive loss uses as its positives.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch import Tensor

from finercam.synth.spec import COLOUR_NAMES, PLAIN, SMALL_PARTS, SynthConfig, discriminative_parts, species_of

VALUES: tuple[str, ...] = (*COLOUR_NAMES, PLAIN)
"""The values a part may take; a requirement stores the index in this tuple."""
ANY = -1
BARE = 0.3
"""Default share of captions that name attributes without a subject ("white wingbar")."""
SLOTS = 1 + len(SMALL_PARTS)
"""Slot 0 holds the genus index; slot ``1 + i`` the value of ``SMALL_PARTS[i]``."""


@dataclass(frozen=True)
class Caption:
    """A caption and what it asserts: ``requirements[s]`` is :data:`ANY` or the required value of slot ``s``."""

    text: str
    requirements: tuple[int, ...]


def mentionable(config: SynthConfig, label: int) -> list[tuple[str, str]]:
    """``(part, value)`` pairs a caption of class ``label`` may mention: the beak, then its genus's species-telling
    parts."""
    species = species_of(config)[label]
    parts = ["beak", *(p for p in discriminative_parts(config, species.genus_index) if p != "beak")]
    return [(part, species.values[part]) for part in parts]


def class_table(config: SynthConfig) -> Tensor:
    """``(C, SLOTS)`` long: each class's genus index and the value index of every small part."""
    rows = [
        [species.genus_index, *(VALUES.index(species.values[part]) for part in SMALL_PARTS)]
        for species in species_of(config)
    ]
    return torch.tensor(rows, dtype=torch.long)


def phrase(part: str, value: str) -> str:
    """``"white wingbar"``, ``"plain throat"``."""
    return f"{value} {part}"


def species_prompt(config: SynthConfig, label: int) -> str:
    """The full description of a class, without article: ``"finch with a black beak and a white wingbar"``."""
    species = species_of(config)[label]
    mentions = " and ".join(f"a {phrase(part, value)}" for part, value in mentionable(config, label))
    return f"{species.genus} with {mentions}"


def sample_caption(config: SynthConfig, label: int, rng: random.Random, bare: float = BARE) -> Caption:
    """A random caption of class ``label``: subject, attribute subset, order and articles are drawn from ``rng``.

    Each mentionable attribute is mentioned with probability 1/2. A caption that mentions attributes has no subject
    with probability ``bare`` ("white wingbar"), else the genus (5 in 7) or "bird" (2 in 7); a caption without
    attributes names the genus (7 in 10) or "bird".
    """
    species = species_of(config)[label]
    pairs = [pair for pair in mentionable(config, label) if rng.random() < 0.5]
    rng.shuffle(pairs)
    draw = rng.random()
    if pairs:
        subject = None if draw < bare else (species.genus if rng.random() < 5 / 7 else "bird")
    else:
        subject = species.genus if draw < 0.7 else "bird"
    article = rng.random() < 0.5
    mentions = [("a " if article or subject else "") + phrase(part, value) for part, value in pairs]
    if subject is None:
        text = " and ".join(mentions)
    else:
        text = ("a " if article else "") + subject + (" with " + " and ".join(mentions) if mentions else "")
    requirements = [ANY] * SLOTS
    if subject == species.genus:
        requirements[0] = species.genus_index
    for part, value in pairs:
        requirements[1 + SMALL_PARTS.index(part)] = VALUES.index(value)
    return Caption(text, tuple(requirements))


def positives(requirements: Tensor, classes: Tensor) -> Tensor:
    """``(B_images, B_captions)`` bool: caption ``j`` is true of image ``i`` (its class meets every requirement).

    Args:
        requirements: ``(B_captions, SLOTS)`` from :attr:`Caption.requirements`.
        classes: ``(B_images, SLOTS)`` rows of :func:`class_table` for the images' labels.
    """
    return ((requirements[None] == ANY) | (requirements[None] == classes[:, None])).all(dim=-1)
