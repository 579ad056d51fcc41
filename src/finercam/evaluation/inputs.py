"""Checks of ``finercam evaluate``'s arguments that argparse cannot make alone, all made before the model is run.

Each raises :class:`~finercam.errors.InvalidArgumentError` naming the option and what it accepts.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from finercam.errors import InvalidArgumentError
from finercam.evaluation.scoring import LOCALIZATION, METRIC_GROUPS
from finercam.images import check_apart

DEFAULT_TOLERANCE = 2
"""Pointing-game tolerance in pixels when ``--tolerance`` is not given."""


def metric_groups(requested: Sequence[str] | None, annotations: str | None) -> tuple[str, ...]:
    """The metric groups to compute: ``requested``, or by default every group (pointing and energy only with
    annotations). Localization asked for without ``--annotations`` is refused."""
    if requested is None:
        return tuple(m for m in METRIC_GROUPS if annotations or m not in LOCALIZATION)
    localization = [m for m in dict.fromkeys(requested) if m in LOCALIZATION]
    if localization and not annotations:
        raise InvalidArgumentError(
            f"--metrics {' '.join(localization)} {'need' if len(localization) > 1 else 'needs'} --annotations "
            "(ground-truth regions: a synthetic dataset's "
            "annotations.json, a CUB-200-2011 folder or a JSON regions file); give --annotations, or choose "
            f"--metrics among {[m for m in METRIC_GROUPS if m not in LOCALIZATION]}"
        )
    return tuple(dict.fromkeys(requested))


def check_arguments(args: argparse.Namespace) -> None:
    """The checks that need several options or the file system: ``--data`` is a folder, ``--out`` is outside it,
    ``--blur-sigma`` goes with ``--fill blur``."""
    data = Path(args.data)
    if data.is_file():
        raise InvalidArgumentError(
            f"--data {str(data)!r} is a file; finercam evaluate takes an ImageFolder folder (one sub-folder of images "
            "per class, named by the class)"
        )
    if not data.is_dir():
        raise InvalidArgumentError(f"--data {str(data)!r} does not exist; give an ImageFolder folder (one sub-folder "
                                   "of images per class)")
    check_apart(data, args.out, "evaluation")
    if args.blur_sigma is not None and args.fill != "blur":
        raise InvalidArgumentError(f"--blur-sigma applies to --fill blur only, but --fill is {args.fill!r}")
    for option, value in (("--regions", args.regions), ("--keypoint-radius", args.keypoint_radius)):
        if value is not None and not args.annotations:
            raise InvalidArgumentError(f"{option} chooses among the regions of --annotations, which is not given")
    if args.tolerance is not None and "pointing" not in metric_groups(args.metrics, args.annotations):
        raise InvalidArgumentError(
            "--tolerance applies to the pointing game, which this evaluation does not compute (it needs "
            "--annotations, and --metrics pointing when --metrics is given)"
        )
    repeated = sorted({k for k in args.ks if args.ks.count(k) > 1})
    if repeated:
        raise InvalidArgumentError(f"--ks repeats {repeated}: give each RD fraction once")


def linear_head(model: nn.Module, spec: str, num_classes: int | None) -> nn.Linear:
    """The classifier whose rows ``--references weights`` compares: the model's last ``nn.Linear``.

    Raises:
        InvalidArgumentError: the model has no ``nn.Linear`` (e.g. a TorchScript model, whose layers are compiled),
            or its last one does not have one output per class.
    """
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise InvalidArgumentError(
            f"--references weights needs a model whose last layer is a linear classifier (torch.nn.Linear); "
            f"{spec} has none; use --references nearest or top"
        )
    head = linears[-1]
    if num_classes is not None and head.out_features != num_classes:
        raise InvalidArgumentError(
            f"--references weights needs a model whose last layer is a linear classifier, but the last linear layer "
            f"of {spec} has {head.out_features} outputs for {num_classes} classes; use --references nearest or top"
        )
    return head
