"""The settings of a ``finercam run`` (:class:`RunSettings`), what they resolve to for a dataset and a device
(workers, shard, explained class, autocast), and the store manifest they produce."""

from __future__ import annotations

import contextlib
import json
import platform
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

import PIL
import safetensors
import torch

import finercam
from finercam.dataset.parallel import default_processes, fork_available, usable_cores
from finercam.dataset.sources import DataSource
from finercam.dataset.store import STORE_FORMAT, STORE_VERSION
from finercam.errors import InvalidArgumentError
from finercam.explain import DEFAULT_GAMMA, DEFAULT_NUM_REFERENCES
from finercam.methods import get_method
from finercam.models.preprocess import Preprocess
from finercam.objectives import AGGREGATIONS

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
TARGETS = ("auto", "label", "prediction")
REFERENCE_STRATEGIES = ("nearest", "top", "weights")
DEFAULT_CHUNK_SIZE = 512
DEFAULT_BATCH_SIZE = 32


def default_workers(device: torch.device) -> int:
    """``DataLoader`` decoding processes of a one-process run with a model on ``device``.

    On CUDA the cores are free for decoding: all but one (for the main process), at most 8. On the CPU (a run with
    ``processes=1``), torch's threads already use every core, so a worker only pays when cores are left over:
    ``(cores - 2) // 2`` (at most 4); on 2 cores that is 0 (decoding in the main process), which measured faster than
    one worker (``benchmarks/run_throughput.py``).
    """
    cores = usable_cores()
    if device.type == "cuda":
        return max(1, min(8, cores - 1))
    return max(0, min(4, (cores - 2) // 2))


def resolve_processes(settings: RunSettings, device: torch.device) -> int:
    """How many worker processes a run uses: ``settings.processes`` when given (more than one only for a CPU model,
    on Linux); else one when ``num_workers`` is given (the ``DataLoader`` layout), else
    :func:`finercam.dataset.parallel.default_processes` (one per core on the CPU, one on a GPU)."""
    if settings.processes is None:
        return 1 if settings.num_workers is not None else default_processes(device)
    if settings.processes > 1 and device.type != "cpu":
        raise InvalidArgumentError(
            f"--processes {settings.processes} is for models on the CPU; the model is on {device}, where one process "
            "is fed by --workers decoding processes"
        )
    if settings.processes > 1 and not fork_available():
        raise InvalidArgumentError(
            f"--processes {settings.processes} needs worker processes forked from this one (Linux); use --processes 1"
        )
    return settings.processes


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` (``0 <= I < N``) -> ``(I, N)``."""
    index, sep, count = text.partition("/")
    try:
        shard = (int(index), int(count))
    except ValueError:
        shard = (-1, 0)
    if not sep or shard[1] < 1 or not 0 <= shard[0] < shard[1]:
        raise InvalidArgumentError(f"--shard must be I/N with 0 <= I < N (e.g. 0/4 ... 3/4); got {text!r}")
    return shard


@dataclass(frozen=True)
class RunSettings:
    r"""How to explain a dataset.

    Attributes:
        method: base CAM (``gradcam``, ``hirescam``, ``xgradcam``, ``gradcam++``, ``layercam``, ``scorecam``).
        layer: target layer name, or ``"auto"``.
        gammas: comparison strengths ``\gamma`` stored per image (the baseline ``\gamma = 0`` is always stored).
        references: ``"nearest"``, ``"top"`` or ``"weights"``.
        num_references: ``T``.
        aggregation: ``"mean"`` (paper) or ``"softmax"``.
        target: the class ``c`` to explain: ``"label"`` (ground truth, as the official scripts do), ``"prediction"``,
            or ``"auto"`` (the label when every image has one, else the prediction).
        batch_size: images per forward pass.
        chunk_size: images per store chunk ``S`` (fixed for the life of a store).
        num_workers: ``DataLoader`` decoding processes of a one-process run (``None``: :func:`default_workers` for
            the model's device; ``0``: decode in the main process).
        processes: CPU worker processes, each decoding and explaining whole batches with one torch thread
            (``None``: :func:`resolve_processes` decides; see :mod:`finercam.dataset.parallel`).
        amp: ``"none"``, ``"bf16"`` or ``"fp16"`` autocast (CUDA only).
        shard: ``(I, N)``.
        max_pixels: the decompression-bomb limit (``None``: Pillow's).
        progress: print the progress line on stderr.
        score_batch_size: masked inputs per forward pass for Score-CAM.
    """

    method: str = "gradcam"
    layer: str = "auto"
    gammas: tuple[float, ...] = (DEFAULT_GAMMA,)
    references: str = "nearest"
    num_references: int = DEFAULT_NUM_REFERENCES
    aggregation: str = "mean"
    target: str = "auto"
    batch_size: int = DEFAULT_BATCH_SIZE
    chunk_size: int = DEFAULT_CHUNK_SIZE
    num_workers: int | None = None
    processes: int | None = None
    amp: str = "none"
    shard: tuple[int, int] = (0, 1)
    max_pixels: int | None = None
    progress: bool = True
    score_batch_size: int = 64

    def check(self) -> None:
        get_method(self.method)
        for name, value, choices in (
            ("references", self.references, REFERENCE_STRATEGIES), ("aggregation", self.aggregation, AGGREGATIONS),
            ("target", self.target, TARGETS), ("amp", self.amp, ("none", *AMP_DTYPES)),
        ):
            if value not in choices:
                raise InvalidArgumentError(f"{name} must be one of {list(choices)}; got {value!r}")
        for name in ("batch_size", "chunk_size", "num_references", "score_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidArgumentError(f"{name} must be an int >= 1; got {value!r}")
        if not self.gammas or any(not 0 <= float(g) < float("inf") for g in self.gammas):
            raise InvalidArgumentError(f"gammas must be one or more finite numbers >= 0; got {list(self.gammas)}")
        if len(set(self.gammas)) != len(self.gammas):
            raise InvalidArgumentError(f"gammas repeats a value: {list(self.gammas)}")
        if self.aggregation == "mean" and all(float(g) == 0 for g in self.gammas):
            raise InvalidArgumentError(
                "gammas [0] alone would store Finer-CAM maps equal to the baseline (with mean aggregation gamma = 0 "
                f"is the plain CAM, which every run stores anyway); give a gamma > 0, e.g. {DEFAULT_GAMMA}"
            )
        if self.processes is not None and (
            isinstance(self.processes, bool) or not isinstance(self.processes, int) or self.processes < 1
        ):
            raise InvalidArgumentError(f"processes must be an int >= 1; got {self.processes!r}")
        if self.processes is not None and self.processes > 1 and self.num_workers is not None:
            raise InvalidArgumentError(
                "give either processes (--processes: CPU worker processes that each decode their own batches) or "
                "num_workers (--workers: decoding processes feeding one model process), not both; got "
                f"processes={self.processes}, num_workers={self.num_workers}"
            )
        index, count = self.shard
        if count < 1 or not 0 <= index < count:
            raise InvalidArgumentError(f"shard must be (I, N) with 0 <= I < N; got {self.shard}")


def autocast_for(amp: str, device: torch.device) -> contextlib.AbstractContextManager[object]:
    """The autocast context of ``--amp`` (none, or bf16 / fp16 on CUDA only)."""
    if amp == "none":
        return contextlib.nullcontext()
    if device.type != "cuda":
        raise InvalidArgumentError(
            f"--amp {amp} needs a CUDA device; the model is on {device}. Use --amp none on the CPU"
        )
    return torch.autocast(device_type="cuda", dtype=AMP_DTYPES[amp])


def target_mode(settings: RunSettings, source: DataSource) -> str:
    """The class a run explains, ``"label"`` or ``"prediction"``, with ``"auto"`` resolved for ``source``."""
    if settings.target == "auto":
        return "label" if source.has_labels else "prediction"
    if settings.target == "label" and not source.has_labels:
        missing = [item.id for item in source.items if item.label is None]
        raise InvalidArgumentError(
            f"target 'label' needs a ground-truth class for every image; {len(missing)} have none "
            f"(e.g. {missing[:5]}). Give labels (ImageFolder folders, or 'path<TAB>label' lines) or use --target "
            "prediction"
        )
    return settings.target


def run_versions() -> dict[str, str]:
    return {
        "finercam": finercam.__version__, "torch": torch.__version__, "python": platform.python_version(),
        "pillow": PIL.__version__, "safetensors": safetensors.__version__,
    }


def build_manifest(
    settings: RunSettings, source: DataSource, preprocess: Preprocess, target: str, model_info: Mapping[str, Any]
) -> dict[str, Any]:
    """The ``store.json`` of a run (before the first batch resolves the layer and the class count)."""
    method = get_method(settings.method)
    manifest = {
        "format": STORE_FORMAT, "version": STORE_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="microseconds"),  # also tells two runs apart
        "chunk_size": settings.chunk_size,
        "config": {
            "model": dict(model_info), "layer": settings.layer, "method": method.name,
            "linear_in_gradient": bool(method.uses_gradients and method.linear_in_gradient),
            "aggregation": settings.aggregation, "gammas": [float(g) for g in settings.gammas],
            "references": settings.references, "num_references": settings.num_references, "target": target,
            "preprocess": asdict(preprocess), "preprocessing": preprocess.describe(), "amp": settings.amp,
        },
        "class_names": list(source.class_names) if source.class_names is not None else None,
        "data": {
            "kind": source.kind, "count": len(source.items), "fingerprint": source.fingerprint(),
            "label_source": source.label_source,
        },
        "source": {"location": str(source.location), "notes": list(source.notes)},
        "versions": run_versions(),
    }
    return json.loads(json.dumps(manifest))
