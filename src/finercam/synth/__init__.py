"""A procedural fine-grained dataset of synthetic birds, with ground-truth part masks.

Genera differ in shape and colour; the species of a genus differ only in the colour of one or more small parts (a
beak, a wing bar, a tail tip, an eye ring, a crown, a throat patch), each a few percent of the image at most. Position,
scale, rotation, facing, pose, colours within the genus, cluttered backgrounds with distractor blobs, and foreground
occluders vary at random, independently of the species. Every image comes with the map of its visible parts, so the
*difference mask* of any two classes (the visible parts whose appearance differs) is known exactly.

>>> from finercam import synth
>>> data = synth.generate(1000, seed=0)           # 12 classes: 3 genera x 4 species, 64 x 64
>>> mask = data.difference_mask(data.labels, 1)   # where each image differs from class 1
>>> synth.write_dataset("birds", train=2000, test=500, seed=0)  # ImageFolder tree + annotations.json
"""

from finercam.synth.dataset import SynthDataset, class_attributes, difference_mask, generate
from finercam.synth.io import load_dataset, write_dataset
from finercam.synth.render import Individuals, render, sample_individuals
from finercam.synth.spec import (
    GENERA,
    MAX_PART_FRACTION,
    OCCLUDER,
    PARTS,
    SMALL_PARTS,
    GenusSpec,
    SynthArgumentError,
    SynthConfig,
    differing_parts,
    species_of,
)

__all__ = [
    "GENERA",
    "MAX_PART_FRACTION",
    "OCCLUDER",
    "PARTS",
    "SMALL_PARTS",
    "GenusSpec",
    "Individuals",
    "SynthArgumentError",
    "SynthConfig",
    "SynthDataset",
    "class_attributes",
    "difference_mask",
    "differing_parts",
    "generate",
    "load_dataset",
    "render",
    "sample_individuals",
    "species_of",
    "write_dataset",
]
