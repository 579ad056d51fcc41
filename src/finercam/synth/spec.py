"""The synthetic birds as data: parts, named colours, genera, the configuration and the classes derived from them.

A bird is drawn as layers, back to front, in the order of :data:`PARTS`. The four *coarse* parts (tail, body, wing,
head) and their proportions and colours are those of the genus; the *small* parts sit inside one coarse part each
(:data:`PARENT`), plus the beak (in front of the head) and the eye. A genus lists the small parts that tell its
species apart and the values each may take (:attr:`GenusSpec.varying`); species ``s`` of a genus takes the mixed-radix
digits of ``s`` (first part fastest) as its values. A small part whose value is ``"plain"`` is painted in its parent's
colour, so it is invisible, but its mask is still where it would be. Units: the body's semi-major axis is 1, ``u``
points forward (to the beak), ``v`` down.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

from finercam.errors import InvalidArgumentError


class SynthArgumentError(InvalidArgumentError):
    """A bad argument to the synthetic dataset generator (configuration, class, split or file)."""


BACKGROUND = 0
PARTS: tuple[str, ...] = (
    "tail", "body", "wing", "head", "tailtip", "throat", "wingbar", "crown", "eyering", "eye", "beak",
)
"""Every part, in painting order; in a part map, part ``PARTS[i]`` has value ``i + 1``."""
OCCLUDER = len(PARTS) + 1
"""Part-map value of the pixels hidden by a foreground occluder (a leaf or a branch); ``0`` is the background."""
COARSE_PARTS = ("tail", "body", "wing", "head")
SMALL_PARTS = ("beak", "eyering", "crown", "throat", "wingbar", "tailtip")
"""The parts whose colour may differ between sibling species."""
PARENT = {"tailtip": "tail", "throat": "body", "wingbar": "wing", "crown": "head", "eyering": "head", "eye": "head"}
PLAIN = "plain"
MAX_PART_FRACTION = 0.03
"""No small part covers more than this fraction of the image (at the largest allowed scale); tested."""
COLOURS: dict[str, tuple[float, float, float]] = {
    "black": (0.10, 0.10, 0.11),
    "white": (0.88, 0.88, 0.84),
    "yellow": (0.88, 0.78, 0.12),
    "orange": (0.88, 0.46, 0.10),
    "red": (0.80, 0.12, 0.10),
    "blue": (0.15, 0.30, 0.85),
}
COLOUR_NAMES = tuple(COLOURS)

GEOMETRY = (
    "body_b", "head_u", "head_v", "head_r", "beak_len", "beak_half", "tail_len", "tail_root", "tail_end",
    "tail_droop", "tip_len", "wing_u", "wing_v", "wing_a", "wing_b", "throat_u", "throat_v", "throat_a", "throat_b",
)
"""Shape parameters of a genus, in body units (``tail_droop`` in degrees), the columns of its geometry table."""


@dataclass(frozen=True)
class GenusSpec:
    """One genus: its shape, its colours and the small parts that tell its species apart.

    Attributes:
        name: genus name (a lowercase word).
        shape: the values of :data:`GEOMETRY`, in that order.
        body_rgb: mean body colour; every individual is jittered around it.
        shades: multipliers of the body colour for the head, the wing and the tail.
        beak: the beak's colour when the beak is not one of the varying parts.
        varying: ``(part, values)`` pairs; species ``s`` takes the mixed-radix digits of ``s`` (first part fastest).
    """

    name: str
    shape: tuple[float, ...]
    body_rgb: tuple[float, float, float]
    shades: tuple[float, float, float]
    beak: str
    varying: tuple[tuple[str, tuple[str, ...]], ...]

    @property
    def max_species(self) -> int:
        """How many distinct species the varying parts allow."""
        return math.prod(len(values) for _, values in self.varying)


#                   body_b head_u head_v head_r beak_len half tail_len root  end  droop tip  wing_u wing_v a    b
#                   throat_u throat_v throat_a throat_b
GENERA: tuple[GenusSpec, ...] = (
    GenusSpec("finch", (0.78, 0.80, -0.58, 0.52, 0.62, 0.40, 0.70, 0.20, 0.34, 15, 0.34, -0.20, 0.02, 0.64, 0.46,
                        0.62, 0.30, 0.34, 0.26),
              (0.56, 0.40, 0.26), (0.92, 0.78, 0.70), "yellow",
              (("beak", ("yellow", "black")), ("wingbar", (PLAIN, "white")), ("crown", (PLAIN, "red", "black")))),
    GenusSpec("warbler", (0.52, 0.88, -0.40, 0.42, 0.88, 0.22, 0.95, 0.15, 0.27, 5, 0.50, -0.15, 0.00, 0.72, 0.34,
                          0.72, 0.14, 0.38, 0.30),
              (0.45, 0.53, 0.22), (1.0, 0.78, 0.72), "black",
              (("eyering", (PLAIN, "white")), ("throat", (PLAIN, "yellow")), ("tailtip", (PLAIN, "white", "red")))),
    GenusSpec("jay", (0.66, 0.78, -0.62, 0.56, 0.64, 0.30, 0.80, 0.18, 0.44, 22, 0.34, -0.22, 0.02, 0.66, 0.42,
                      0.64, 0.24, 0.34, 0.26),
              (0.38, 0.48, 0.70), (0.95, 0.78, 0.72), "black",
              (("crown", (PLAIN, "black")), ("tailtip", (PLAIN, "white")), ("wingbar", (PLAIN, "white", "black")))),
    GenusSpec("gull", (0.56, 0.86, -0.46, 0.44, 0.84, 0.24, 0.55, 0.22, 0.28, 0, 0.50, -0.35, 0.00, 0.95, 0.36,
                       0.70, 0.18, 0.36, 0.28),
              (0.78, 0.78, 0.76), (1.0, 0.70, 0.75), "yellow",
              (("tailtip", (PLAIN, "black")), ("eyering", (PLAIN, "red")), ("beak", ("yellow", "red", "black")))),
    GenusSpec("robin", (0.70, 0.76, -0.56, 0.48, 0.56, 0.30, 0.70, 0.16, 0.32, 25, 0.42, -0.20, 0.02, 0.62, 0.44,
                        0.62, 0.26, 0.34, 0.28),
              (0.30, 0.28, 0.32), (1.0, 0.80, 0.85), "yellow",
              (("throat", (PLAIN, "red")), ("wingbar", (PLAIN, "white")), ("crown", (PLAIN, "white", "orange")))),
)


@dataclass(frozen=True)
class SynthConfig:
    """How to draw the dataset. Every field has a default; :func:`finercam.synth.generate` accepts them as keywords.

    Attributes:
        image_size: side of the square images in pixels (at least 32).
        num_genera: how many genera of :data:`GENERA` to use (1 to 5).
        species_per_genus: species per genus (1 to the genus's ``max_species``, 12 for each built-in genus).
        scale: range of the body's semi-major axis, as a fraction of ``image_size``.
        max_rotation: the bird is rotated by up to this many degrees either way.
        occlusion: probability that an image gets a foreground occluder (a leaf or a branch).
        min_visible: an occluder never hides more than ``1 - min_visible`` of any part that varies within the genus,
            so that every species stays identifiable.
        distractors: coloured blobs per background, drawn in the parts' colours so that colour alone is no cue.
        noise: standard deviation of the pixel noise (clipped at 3 sigma). Up to 0.02 no bird pixel saturates, so
            two sibling renderings of an individual differ in every pixel of their difference mask.
    """

    image_size: int = 64
    num_genera: int = 3
    species_per_genus: int = 4
    scale: tuple[float, float] = (0.17, 0.21)
    max_rotation: float = 25.0
    occlusion: float = 0.5
    min_visible: float = 0.5
    distractors: int = 4
    noise: float = 0.02

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "scale", tuple(float(s) for s in self.scale))
        except (TypeError, ValueError):
            raise SynthArgumentError(f"scale={self.scale!r} is not allowed: expected a pair of floats") from None
        checks = [
            (isinstance(self.image_size, int) and self.image_size >= 32, "image_size", "an int >= 32"),
            (isinstance(self.num_genera, int) and 1 <= self.num_genera <= len(GENERA), "num_genera",
             f"an int from 1 to {len(GENERA)}"),
            (len(self.scale) == 2 and 0.05 <= self.scale[0] <= self.scale[1] <= 0.22, "scale",
             "a pair (low, high) with 0.05 <= low <= high <= 0.22"),
            (0 <= self.max_rotation <= 45, "max_rotation", "degrees from 0 to 45"),
            (0 <= self.occlusion <= 1, "occlusion", "a probability from 0 to 1"),
            (0 <= self.min_visible <= 1, "min_visible", "a fraction from 0 to 1"),
            (isinstance(self.distractors, int) and 0 <= self.distractors <= 16, "distractors", "an int from 0 to 16"),
            (0 <= self.noise <= 0.1, "noise", "a standard deviation from 0 to 0.1"),
        ]
        for ok, name, accepted in checks:
            if not ok:
                raise SynthArgumentError(f"{name}={getattr(self, name)!r} is not allowed: expected {accepted}")
        most = min(genus.max_species for genus in GENERA[: self.num_genera])
        if not (isinstance(self.species_per_genus, int) and 1 <= self.species_per_genus <= most):
            raise SynthArgumentError(
                f"species_per_genus={self.species_per_genus!r} is not allowed: expected an int from 1 to {most}"
            )
        if self.num_genera * self.species_per_genus < 2:
            raise SynthArgumentError("the dataset needs at least 2 classes (num_genera * species_per_genus >= 2)")

    @property
    def num_classes(self) -> int:
        """``num_genera * species_per_genus``; class ``k`` is species ``k % species_per_genus`` of genus
        ``k // species_per_genus``."""
        return self.num_genera * self.species_per_genus

    def to_dict(self) -> dict[str, object]:
        """The fields as JSON-friendly values."""
        return {key: list(value) if isinstance(value, tuple) else value
                for key, value in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, fields: dict[str, object]) -> SynthConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        unknown = set(fields) - {field.name for field in dataclasses.fields(cls)}
        if unknown:
            raise SynthArgumentError(f"unknown configuration keys {sorted(unknown)}")
        return cls(**fields)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Species:
    """One class: its label, genus and the value (a colour name or ``"plain"``) of every small part and the eye."""

    label: int
    genus_index: int
    genus: str
    values: dict[str, str]
    name: str


@functools.lru_cache(maxsize=32)
def species_of(config: SynthConfig) -> tuple[Species, ...]:
    """The classes of a configuration, in label order."""
    classes = []
    for g, genus in enumerate(GENERA[: config.num_genera]):
        used, span = [], 1  # the varying parts that actually vary among the configured species
        for part, values in genus.varying:
            if config.species_per_genus > span:
                used.append(part)
            span *= len(values)
        for s in range(config.species_per_genus):
            values = {part: PLAIN for part in SMALL_PARTS} | {"beak": genus.beak, "eye": "black"}
            rest = s
            for part, options in genus.varying:
                values[part], rest = options[rest % len(options)], rest // len(options)
            label = g * config.species_per_genus + s
            name = "-".join([f"{label:02d}", genus.name, *(f"{values[part]}_{part}" for part in used)])
            classes.append(Species(label, g, genus.name, values, name))
    return tuple(classes)


def differing_parts(config: SynthConfig, class_a: int, class_b: int) -> tuple[str, ...]:
    """The parts whose appearance differs between two classes: every part across genera (the shapes differ), else
    the small parts whose values differ."""
    classes = species_of(config)
    for label in (class_a, class_b):
        if not 0 <= int(label) < len(classes):
            raise SynthArgumentError(f"class {label} does not exist: expected 0 to {len(classes) - 1}")
    a, b = classes[int(class_a)], classes[int(class_b)]
    if a.genus_index != b.genus_index:
        return PARTS
    return tuple(part for part in PARTS if a.values.get(part) != b.values.get(part))


def discriminative_parts(config: SynthConfig, genus_index: int) -> tuple[str, ...]:
    """The small parts whose value differs between at least two species of a genus."""
    values = [c.values for c in species_of(config) if c.genus_index == genus_index]
    return tuple(part for part in SMALL_PARTS if len({v[part] for v in values}) > 1)
