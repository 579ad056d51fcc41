"""``finercam train-probe``: a linear classifier on the pooled features of a frozen backbone.

Features of every image are computed once and cached (keyed by the backbone, its weights file, the preprocessing
and the image files' paths, sizes and modification times), so a second run with other training settings costs
seconds. The head ``W`` (C x D) is trained with full-batch L-BFGS on the cross-entropy plus an L2 penalty, and saved
with its class names in a safetensors file that ``--head`` loads.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from finercam.errors import InvalidArgumentError
from finercam.images import ImageFolder, load_image
from finercam.metrics import top1_accuracy
from finercam.models import LoadedBackbone, save_head

Log = Callable[[str], None]


@dataclass(frozen=True)
class ProbeReport:
    """What ``train-probe`` did: sizes, accuracies, timings and where the head went."""

    head_path: Path
    classes: tuple[str, ...]
    train_images: int
    val_images: int
    train_accuracy: float
    val_accuracy: float
    feature_seconds: float
    train_seconds: float
    cached: tuple[bool, bool]


def _fingerprint(backbone: LoadedBackbone, folder: ImageFolder, weights: str | None) -> str:
    digest = hashlib.sha256()
    parts: list[object] = [backbone.spec, repr(backbone.preprocess), backbone.dim, folder.classes]
    if weights:
        stat = Path(weights).stat()
        parts += [str(Path(weights).resolve()), stat.st_size, stat.st_mtime_ns]
    for path, label in folder.samples:
        stat = path.stat()
        parts.append((str(path.resolve()), label, stat.st_size, stat.st_mtime_ns))
    digest.update(json.dumps(parts, default=str).encode())
    return digest.hexdigest()[:20]


def _batches(folder: ImageFolder, backbone: LoadedBackbone, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Preprocessed images in batches; consecutive images of equal size are stacked (variable-size presets)."""
    if batch_size < 1:
        raise InvalidArgumentError(f"batch size must be at least 1; got {batch_size}")
    pending: list[Tensor] = []
    labels: list[int] = []
    for path, label in folder.samples:
        tensor = backbone.preprocess(load_image(path))
        if pending and (tensor.shape != pending[0].shape or len(pending) == batch_size):
            yield torch.stack(pending), torch.tensor(labels)
            pending, labels = [], []
        pending.append(tensor)
        labels.append(label)
    if pending:
        yield torch.stack(pending), torch.tensor(labels)


def extract_features(
    backbone: LoadedBackbone,
    folder: ImageFolder,
    cache_dir: Path,
    *,
    weights: str | None = None,
    batch_size: int = 32,
    log: Log = print,
) -> tuple[Tensor, Tensor, bool]:
    """Pooled features ``(N, D)`` and labels ``(N,)`` of a split, from the cache when present.

    Returns:
        features, labels, and whether they came from the cache (an empty split, which needs nothing, counts as
        cached).
    """
    if not folder.samples:  # an empty split (e.g. no class with two images to hold one out): nothing to extract
        return torch.empty(0, backbone.dim), torch.empty(0, dtype=torch.long), True
    cache = cache_dir / f"features-{_fingerprint(backbone, folder, weights)}.safetensors"
    if cache.is_file():
        stored = load_file(cache)
        return stored["features"], stored["labels"], True
    device = next(iter(backbone.features.parameters()), torch.empty(0)).device
    features, labels, done, start = [], [], 0, time.perf_counter()
    with torch.inference_mode():
        for images, batch_labels in _batches(folder, backbone, batch_size):
            features.append(backbone.features(images.to(device)).float().cpu())
            labels.append(batch_labels)
            done += len(batch_labels)
            rate = done / max(time.perf_counter() - start, 1e-9)
            log(f"  features {done}/{len(folder.samples)} ({rate:.1f} images/s)")
    result = torch.cat(features), torch.cat(labels)
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = cache.with_suffix(".partial")
    save_file({"features": result[0].contiguous(), "labels": result[1].contiguous()}, partial)
    os.replace(partial, cache)  # atomic: an interrupted run leaves no half-written cache
    return result[0], result[1], False


def fit_linear_head(
    features: Tensor, labels: Tensor, num_classes: int, *, weight_decay: float = 1e-4, iterations: int = 200
) -> nn.Linear:
    """Multinomial logistic regression ``y = W f + b`` by full-batch L-BFGS."""
    head = nn.Linear(features.shape[1], num_classes)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    optimizer = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=iterations, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(head(features), labels) + weight_decay * head.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    head.requires_grad_(False)
    return head


def accuracy(head: nn.Linear, features: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy of ``head`` on features (NaN for an empty split, which has no accuracy)."""
    return top1_accuracy(head, features, labels) if len(labels) else float("nan")


def train_probe(
    backbone: LoadedBackbone,
    train: ImageFolder,
    val: ImageFolder,
    head_path: Path,
    *,
    cache_dir: Path,
    weights: str | None = None,
    batch_size: int = 32,
    weight_decay: float = 1e-4,
    metadata: dict[str, str] | None = None,
    log: Log = print,
) -> ProbeReport:
    """Extract (or load cached) features of both splits, fit the head, report accuracies, save the head."""
    start = time.perf_counter()
    train_features, train_labels, train_cached = extract_features(
        backbone, train, cache_dir, weights=weights, batch_size=batch_size, log=log
    )
    val_features, val_labels, val_cached = extract_features(
        backbone, val, cache_dir, weights=weights, batch_size=batch_size, log=log
    )
    feature_seconds = time.perf_counter() - start
    start = time.perf_counter()
    head = fit_linear_head(train_features, train_labels, len(train.classes), weight_decay=weight_decay)
    train_seconds = time.perf_counter() - start
    report = ProbeReport(
        head_path=head_path,
        classes=train.classes,
        train_images=len(train_labels),
        val_images=len(val_labels),
        train_accuracy=accuracy(head, train_features, train_labels),
        val_accuracy=accuracy(head, val_features, val_labels),
        feature_seconds=feature_seconds,
        train_seconds=train_seconds,
        cached=(train_cached, val_cached),
    )
    meta = {
        "backbone": backbone.spec,
        "val_accuracy": f"{report.val_accuracy:.6f}",
        "train_images": str(report.train_images),
        **(metadata or {}),
    }
    save_head(head_path, head, list(train.classes), meta)
    return report


def class_summary(classes: Sequence[str], limit: int = 8) -> str:
    """A short listing of class names for the console."""
    shown = ", ".join(classes[:limit])
    return shown + (f", ... ({len(classes)} in all)" if len(classes) > limit else "")
