"""``finercam train-probe``: a linear classifier on the pooled features of a frozen backbone.

Features of every image are computed once and cached (:mod:`finercam.feature_cache`: keyed by the backbone's
weights and preprocessing and by each image file), so a second run with other training settings or another split
costs seconds, and an interrupted one resumes.
The head ``W`` (C x D) is trained with full-batch L-BFGS on the cross-entropy plus an L2 penalty, and saved
with its class names in a safetensors file that ``--head`` loads.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from finercam.errors import InvalidArgumentError
from finercam.feature_cache import backbone_key, extract_features
from finercam.images import ImageFolder
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


def fit_linear_head(
    features: Tensor, labels: Tensor, num_classes: int, *, weight_decay: float = 1e-4, iterations: int = 200
) -> nn.Linear:
    """Multinomial logistic regression ``y = W f + b`` by full-batch L-BFGS, in float32 on the features' device
    (also when called under ``torch.no_grad()`` or ``torch.inference_mode()``).

    Raises:
        InvalidArgumentError: features not ``(N, D)``, labels not ``N`` class indices in ``[0, num_classes)``.
    """
    labels = torch.as_tensor(labels, device=features.device)
    if features.dim() != 2 or labels.shape != (features.shape[0],):
        raise InvalidArgumentError(f"fit_linear_head needs features (N, D) and N labels; got features "
                                   f"{tuple(features.shape)} and labels {tuple(labels.shape)}")
    if labels.is_floating_point() or (len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < num_classes):
        raise InvalidArgumentError(f"labels must be class indices from 0 to {num_classes - 1}; got values "
                                   f"{labels.min().item()} to {labels.max().item()} ({labels.dtype})")
    with torch.inference_mode(False), torch.enable_grad():
        features, labels = features.detach().float().clone(), labels.long().clone()  # normal tensors, not inference
        head = nn.Linear(features.shape[1], num_classes, device=features.device)
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
    batch_size: int = 32,
    weight_decay: float = 1e-4,
    metadata: dict[str, str] | None = None,
    log: Log = print,
) -> ProbeReport:
    """Extract (or load cached) features of both splits, fit the head, report accuracies, save the head."""
    start = time.perf_counter()
    key = backbone_key(backbone)  # once for both splits
    train_features, train_labels, train_cached = extract_features(
        backbone, train, cache_dir, batch_size=batch_size, key=key, log=log
    )
    val_features, val_labels, val_cached = extract_features(
        backbone, val, cache_dir, batch_size=batch_size, key=key, log=log
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
