"""Means with bootstrap confidence intervals over images."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from finercam.errors import InvalidArgumentError

DEFAULT_RESAMPLES = 2000
DEFAULT_LEVEL = 0.95


@dataclass(frozen=True)
class Estimate:
    """A mean over ``n`` images with a percentile-bootstrap confidence interval ``[low, high]`` at ``level``."""

    mean: float
    low: float
    high: float
    n: int
    level: float = DEFAULT_LEVEL

    def as_dict(self) -> dict[str, float | int]:
        return {"mean": self.mean, "low": self.low, "high": self.high, "n": self.n}


def bootstrap(
    values: Tensor, resamples: int = DEFAULT_RESAMPLES, level: float = DEFAULT_LEVEL, seed: int = 0
) -> list[Estimate]:
    """Mean and percentile-bootstrap confidence interval of each column of ``values``.

    Args:
        values: ``(N,)`` or ``(N, M)``: one row per image, one column per quantity. NaN entries (e.g. an image
            without an annotation) are left out of their column; the resampled rows are shared by all columns
            (a paired bootstrap), so differences between columns are resampled consistently.
        resamples: bootstrap resamples. level: coverage of the interval, e.g. 0.95. seed: the resampling seed.

    Returns:
        One :class:`Estimate` per column (NaN mean and bounds for a column without values).
    """
    if not 0 < level < 1:
        raise InvalidArgumentError(f"level must be in (0, 1); got {level}")
    if resamples < 1:
        raise InvalidArgumentError(f"resamples must be >= 1; got {resamples}")
    table = values.detach().double().cpu()
    table = table[:, None] if table.ndim == 1 else table
    count = table.shape[0]
    present = ~table.isnan()
    clean = torch.where(present, table, torch.zeros_like(table))
    estimates = []
    if count == 0:
        return [Estimate(float("nan"), float("nan"), float("nan"), 0, level) for _ in range(table.shape[1])]
    generator = torch.Generator().manual_seed(seed)
    sums, counts = [], []
    for start in range(0, resamples, 256):  # resample counts per image, a block of resamples at a time
        block = min(256, resamples - start)
        rows = torch.randint(0, count, (block, count), generator=generator)
        ones = torch.ones(block, count, dtype=torch.float64)
        weights = torch.zeros(block, count, dtype=torch.float64).scatter_add_(1, rows, ones)
        sums.append(weights @ clean)
        counts.append(weights @ present.double())
    total, counts = torch.cat(sums), torch.cat(counts)  # (R, M)
    means = total / counts.clamp(min=1)
    for column in range(table.shape[1]):
        n = int(present[:, column].sum())
        if n == 0:
            estimates.append(Estimate(float("nan"), float("nan"), float("nan"), 0, level))
            continue
        valid = means[counts[:, column] > 0, column]
        alpha = (1 - level) / 2
        low, high = torch.quantile(valid, torch.tensor([alpha, 1 - alpha], dtype=valid.dtype)).tolist()
        mean = float(clean[:, column].sum() / n)
        estimates.append(Estimate(mean, low, high, n, level))
    return estimates
