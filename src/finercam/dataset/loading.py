"""Batches of decoded images from a torch ``DataLoader``, so that decoding in worker processes overlaps the CAMs.

The work is planned in **chunks**: chunk ``k`` is the listing positions ``[k S, (k + 1) S)`` for the store's chunk
size ``S``; each chunk is split into batches of at most ``batch_size`` positions. A chunk is the unit of sharding
(shard ``i`` of ``N`` takes the chunks with ``k mod N == i``), of resuming and of writing. Because a chunk's batches
never depend on what was done before, a resumed or sharded run computes every image in exactly the same batch as an
uninterrupted run, so their stores are bitwise identical.

A collated :class:`Batch` holds the good images grouped by input size (preprocessing that keeps the aspect ratio
gives several sizes; each group is stacked in the worker and explained as one tensor) and the skipped positions
with their reasons.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from finercam.dataset.decode import Decoded, decode
from finercam.dataset.sources import DataItem
from finercam.dataset.store import chunk_range
from finercam.models.preprocess import Preprocess


@dataclass(frozen=True)
class Sample:
    """One decoded listing position."""

    index: int
    decoded: Decoded


@dataclass
class SizeGroup:
    """Images of one input size: listing positions, ``(n, 3, H, W)`` pixels, ``(n, 2)`` decoded image sizes."""

    indices: list[int]
    pixels: Tensor
    image_sizes: Tensor

    def pin_memory(self) -> SizeGroup:
        return SizeGroup(self.indices, self.pixels.pin_memory(), self.image_sizes)


@dataclass
class Batch:
    """A collated batch: the planned positions, the good images by size, and the skipped positions."""

    chunk: int
    indices: list[int]
    groups: list[SizeGroup] = field(default_factory=list)
    skipped: dict[int, str] = field(default_factory=dict)

    def pin_memory(self) -> Batch:
        """Called by the ``DataLoader`` when ``pin_memory=True``."""
        return Batch(self.chunk, self.indices, [group.pin_memory() for group in self.groups], self.skipped)


class ImageDataset(Dataset[Sample]):
    """Listing position -> :class:`Sample` (the preprocessed image or the reason it was skipped)."""

    def __init__(self, items: Sequence[DataItem], preprocess: Preprocess, max_pixels: int | None) -> None:
        self.items = items
        self.preprocess = preprocess
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Sample:
        return Sample(index, decode(self.items[index].path, self.preprocess, self.max_pixels))


def collate(samples: list[Sample], chunk_size: int) -> Batch:
    """Group the decoded samples of one planned batch by input size (first-seen order) and stack each group."""
    by_size: dict[tuple[int, ...], list[Sample]] = {}
    skipped: dict[int, str] = {}
    for sample in samples:
        if sample.decoded.pixels is None:
            skipped[sample.index] = sample.decoded.reason or "unknown"
        else:
            by_size.setdefault(tuple(sample.decoded.pixels.shape), []).append(sample)
    groups = [
        SizeGroup(
            [s.index for s in members],
            torch.stack([s.decoded.pixels for s in members]),  # type: ignore[misc]
            torch.tensor([s.decoded.image_size for s in members], dtype=torch.int32),
        )
        for members in by_size.values()
    ]
    indices = [sample.index for sample in samples]
    return Batch(indices[0] // chunk_size, indices, groups, skipped)


def plan_batches(chunks: Sequence[int], chunk_size: int, batch_size: int, total: int) -> list[list[int]]:
    """The batches (lists of listing positions) of the given chunks, in order; no batch spans two chunks."""
    batches = []
    for chunk in chunks:
        positions = chunk_range(chunk, chunk_size, total)
        batches += [list(positions[start:start + batch_size]) for start in range(0, len(positions), batch_size)]
    return batches


class _Collate:
    """A picklable ``collate_fn`` (worker processes may be spawned)."""

    def __init__(self, chunk_size: int) -> None:
        self.chunk_size = chunk_size

    def __call__(self, samples: list[Sample]) -> Batch:
        return collate(samples, self.chunk_size)


def batch_loader(
    dataset: ImageDataset, batches: list[list[int]], chunk_size: int, *, num_workers: int, pin_memory: bool
) -> DataLoader:
    """A ``DataLoader`` yielding the planned batches in order, decoded by ``num_workers`` processes."""
    return DataLoader(
        dataset,
        batch_sampler=batches,
        collate_fn=_Collate(chunk_size),
        num_workers=num_workers,
        pin_memory=pin_memory,
        prefetch_factor=4 if num_workers > 0 else None,
        persistent_workers=False,
    )
