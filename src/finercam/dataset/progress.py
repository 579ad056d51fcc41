"""The summary of a ``finercam run`` (the progress line is :class:`finercam.progress.Progress`)."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field


@dataclass
class RunSummary:
    """What one ``finercam run`` did (saved as ``summary.json``).

    Attributes:
        store: the store folder.
        shard: ``[I, N]``.
        listed: images in the whole listing.
        in_shard: images of this shard.
        already_done: images of this shard found in the store when the run started (resumed).
        processed: images read in this run; ``explained`` of them got maps, ``skipped`` did not.
        skip_reasons: count per reason category over the whole shard.
        skipped_files: ``[id, reason]`` of every skipped image of this shard.
        seconds, images_per_second: wall time of the processing loop, and its throughput.
        accuracy: top-1 accuracy over the explained images of this shard that have a label, else ``None``.
        chunk_files: chunk files of the store (all shards).
        notes: what the user should know (label conventions, resumption).
    """

    store: str
    shard: list[int]
    listed: int
    in_shard: int
    already_done: int = 0
    processed: int = 0
    explained: int = 0
    skipped: int = 0
    skip_reasons: dict[str, int] = field(default_factory=dict)
    skipped_files: list[list[str]] = field(default_factory=list)
    seconds: float = 0.0
    images_per_second: float = 0.0
    accuracy: float | None = None
    chunk_files: int = 0
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)

    def set_skipped(self, skipped: list[tuple[str, str]]) -> None:
        self.skipped_files = [[image_id, reason] for image_id, reason in skipped]
        self.skip_reasons = dict(Counter(reason.split(":", 1)[0] for _, reason in skipped).most_common())

    def lines(self, shown: int = 10) -> list[str]:
        """The console summary."""
        head = f"store: {self.store}"
        if self.shard[1] > 1:
            head += f"  (shard {self.shard[0]}/{self.shard[1]}: {self.in_shard} of {self.listed} images)"
        lines = [head]
        if self.already_done:
            lines.append(f"resumed: {self.already_done} images were already in the store")
        lines.append(
            f"this run: {self.processed} images in {self.seconds:.1f} s ({self.images_per_second:.1f} img/s): "
            f"{self.explained} explained, {self.skipped} skipped"
        )
        if self.accuracy is not None:
            lines.append(f"accuracy (top-1, explained images with a label): {self.accuracy:.2%}")
        if self.skipped_files:
            reasons = ", ".join(f"{reason} {count}" for reason, count in self.skip_reasons.items())
            lines.append(f"skipped files ({len(self.skipped_files)}: {reasons}):")
            lines += [f"  {image_id}: {reason}" for image_id, reason in self.skipped_files[:shown]]
            if len(self.skipped_files) > shown:
                lines.append(f"  ... {len(self.skipped_files) - shown} more in summary.json")
        lines += [f"note: {note}" for note in self.notes]
        lines.append(f"chunk files: {self.chunk_files}")
        return lines
