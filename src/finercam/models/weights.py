"""Reading checkpoints safely and loading them into models with errors that say what does not fit.

Checkpoints are ``.safetensors`` files or files written by ``torch.save`` and read with ``weights_only=True``: no
arbitrary Python object is ever unpickled (besides tensors and containers, only ``argparse.Namespace`` and numpy
arrays and scalars are allowed, which training scripts such as timm's store beside the weights). The state dict may
sit under ``state_dict``, ``model``,
``model_state_dict`` or ``module``; ``module.`` (DataParallel) and ``_orig_mod.`` (torch.compile) prefixes are
stripped.
"""

from __future__ import annotations

import argparse
import contextlib
import pickle
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from finercam.errors import ModelFileNotFoundError, WeightsError

StateDict = dict[str, Tensor]
Filter = Callable[[StateDict, nn.Module], StateDict]
_NESTING_KEYS = ("state_dict", "model", "model_state_dict", "module", "net", "network")
_STRIPPED_PREFIXES = ("module.", "_orig_mod.")
_SHOWN = 5


def existing_file(path: str | Path, what: str) -> Path:
    """``path`` as a :class:`Path`, checked to be an existing file.

    Raises:
        ModelFileNotFoundError: it does not exist or is a directory.
    """
    resolved = Path(path).expanduser()
    if not resolved.exists():
        raise ModelFileNotFoundError(f"{what} {str(path)!r} does not exist")
    if not resolved.is_file():
        raise ModelFileNotFoundError(f"{what} {str(path)!r} is a directory, not a file")
    return resolved


def _allowed_globals() -> list[object]:
    """Harmless types that training checkpoints often hold beside the weights."""
    allowed: list[object] = [argparse.Namespace, np.ndarray, np.dtype]
    multiarray = getattr(getattr(np, "_core", None), "multiarray", None) or np.core.multiarray
    allowed += [multiarray.scalar, multiarray._reconstruct]
    allowed += [type(np.dtype(code)) for code in ("f2", "f4", "f8", "i1", "i2", "i4", "i8", "u1", "b1")]
    return allowed


def is_safetensors(file: Path) -> bool:
    """Whether a file is in the safetensors format (an 8-byte header length, then a JSON header)."""
    with file.open("rb") as handle:
        start = handle.read(9)
    return len(start) == 9 and start[8:9] == b"{"


def read_checkpoint(path: str | Path, what: str = "weights file") -> object:
    """The raw object in a checkpoint: a dict of tensors for safetensors, else whatever ``torch.load`` returns with
    ``weights_only=True`` (tensors, dicts, lists, numbers, strings).

    Raises:
        ModelFileNotFoundError: the file does not exist.
        WeightsError: the file is not a checkpoint, is a TorchScript archive, or holds pickled Python objects.
    """
    file = existing_file(path, what)
    if is_safetensors(file):
        from finercam.models._deps import require

        safetensors_torch = require("safetensors.torch", f"reading {file.name}")
        try:
            return safetensors_torch.load_file(str(file), device="cpu")
        except Exception as error:  # safetensors raises its own SafetensorError
            raise WeightsError(f"{what} {str(path)!r} is not a readable safetensors file: {error}") from None
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if re.search(r"Unsupported operand|invalid load key|could not find MARK", str(error)):
            raise WeightsError(
                f"{what} {str(path)!r} is not a checkpoint (neither safetensors nor a torch.save file)"
            ) from None
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
        what_object = f"a pickled {found.group(1)}" if found else "pickled Python objects"
        raise WeightsError(
            f"{what} {str(path)!r} holds {what_object}, which finercam does not unpickle (torch.load with "
            "weights_only=True refuses arbitrary code). Re-save only the weights, e.g. "
            "torch.save(model.state_dict(), path), or save them as .safetensors"
        ) from None
    except RuntimeError as error:
        if "TorchScript" in str(error):
            raise WeightsError(
                f"{what} {str(path)!r} is a TorchScript archive, not a state dict; load it as the model with "
                f"'torchscript:{path}'"
            ) from None
        raise WeightsError(f"{what} {str(path)!r} cannot be read by torch.load: {error}") from None
    except (EOFError, OSError, ValueError) as error:
        raise WeightsError(
            f"{what} {str(path)!r} is not a PyTorch checkpoint ({type(error).__name__}: {error})"
        ) from None
    except Exception:  # text or other bytes break the unpickler in content-dependent ways
        # (IndexError, KeyError, ...), and torch.load hands *.safetensors names to safetensors (SafetensorError)
        raise WeightsError(
            f"{what} {str(path)!r} is not a checkpoint (neither safetensors nor a torch.save file)"
        ) from None


def unwrap_state_dict(checkpoint: object, source: str) -> StateDict:
    """The tensors of a state dict, however the checkpoint nests it.

    Raises:
        WeightsError: no tensors found.
    """
    current = checkpoint
    for _ in range(3):
        if not isinstance(current, Mapping):
            break
        # a nested state dict wins over tensors beside it ({"state_dict": {...}, "best_acc1": tensor(71.3)}, as the
        # PyTorch ImageNet example saves): a state dict's own values are tensors, never mappings
        nested = next((current[k] for k in _NESTING_KEYS if isinstance(current.get(k), Mapping)), None)
        if nested is None:
            break
        current = nested
    if not isinstance(current, Mapping) or not any(isinstance(v, Tensor) for v in current.values()):
        keys = list(current)[:8] if isinstance(current, Mapping) else type(current).__name__
        raise WeightsError(
            f"{source} holds no state dict (found {keys}); expected a mapping of parameter names to tensors, "
            f"possibly under one of {list(_NESTING_KEYS)}"
        )
    state = {str(k): v for k, v in current.items() if isinstance(v, Tensor)}
    for prefix in _STRIPPED_PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def read_state_dict(path: str | Path, what: str = "weights file") -> StateDict:
    """Read a checkpoint file and return its state dict (see :func:`read_checkpoint`, :func:`unwrap_state_dict`)."""
    return unwrap_state_dict(read_checkpoint(path, what), f"{what} {str(path)!r}")


def _problems(model: nn.Module, state: StateDict) -> tuple[list[str], list[str], list[str]]:
    expected = model.state_dict()
    mismatched = [
        f"{key}: checkpoint {tuple(state[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in expected
        if key in state and state[key].shape != expected[key].shape
    ]
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    return mismatched, missing, unexpected


def _align_prefix(model: nn.Module, state: StateDict) -> StateDict:
    """Drop or add one leading module name when that makes the keys match (``model.``, ``backbone.`` ...)."""
    expected = set(model.state_dict())
    if not state or set(state) & expected:
        return state
    first = next(iter(state))
    if "." in first:
        prefix = first.split(".", 1)[0] + "."
        if all(k.startswith(prefix) for k in state):
            stripped = {k[len(prefix):]: v for k, v in state.items()}
            if set(stripped) & expected:
                return stripped
    return state


def load_into(
    model: nn.Module,
    state: StateDict,
    source: str,
    *,
    filter_fn: Filter | None = None,
    ignore_unexpected: Callable[[str], bool] | None = None,
    hint: str = "",
    classifier: str | None = None,
) -> None:
    """Load ``state`` into ``model`` strictly, or raise an error naming what does not fit.

    Args:
        model: the model to fill.
        state: parameter name -> tensor.
        source: the file, for messages.
        filter_fn: a converter tried when the keys or shapes do not match as they are (timm's
            ``checkpoint_filter_fn``, which maps e.g. official DINOv2 checkpoints to timm names).
        ignore_unexpected: keys in the checkpoint that may be dropped (e.g. a classifier when loading a backbone).
        hint: appended to shape-mismatch messages.
        classifier: the dotted name of the model's classifier (``fc``, ``head``): when its weight has another
            number of rows in the checkpoint, the message says how many classes each has (and ``hint`` follows).

    Raises:
        WeightsError: shapes differ, or keys are missing or unexpected.
    """
    candidates = [_align_prefix(model, state)]
    if filter_fn is not None:
        with contextlib.suppress(Exception):  # a converter that does not apply to this checkpoint
            converted = filter_fn(dict(state), model)
            if not _resampled(state, converted):
                candidates.append(converted)
    report = None
    for candidate in candidates:
        if ignore_unexpected is not None:
            expected = model.state_dict()
            candidate = {k: v for k, v in candidate.items() if k in expected or not ignore_unexpected(k)}
        mismatched, missing, unexpected = _problems(model, candidate)
        if not (mismatched or missing or unexpected):
            model.load_state_dict(candidate, strict=True)
            return
        if report is None:
            report = (mismatched, missing, unexpected, candidate)
    assert report is not None
    mismatched, missing, unexpected, reported = report
    if mismatched:
        classes = _class_count_note(model, reported, classifier) if classifier else ""
        notes = " ".join(note for note in (classes, hint if classes else "") if note)
        raise WeightsError(
            f"{source} does not fit {type(model).__name__}: {len(mismatched)} tensor(s) have other shapes, first: "
            + "; ".join(mismatched[:_SHOWN]) + (f". {notes}" if notes else "")
        )
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (first: {missing[:_SHOWN]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (first: {unexpected[:_SHOWN]})")
    raise WeightsError(
        f"{source} does not fit {type(model).__name__}: its keys differ, " + " and ".join(parts)
        + ". Is it a checkpoint of this architecture?"
    )


def _resampled(state: StateDict, converted: Mapping[str, object]) -> list[str]:
    """The tensors a converter changed in size under their own name (timm's ``checkpoint_filter_fn`` resamples the
    position embedding and patch projection of a checkpoint made for another input or patch size, which is another
    network than the one trained): such a conversion is not used, and the mismatch is reported instead."""
    return [key for key, value in converted.items()
            if isinstance(value, Tensor) and key in state and value.numel() != state[key].numel()]


def _class_count_note(model: nn.Module, state: StateDict, classifier: str) -> str:
    """``The checkpoint's classifier 'fc' has 7 classes and the architecture 5.`` when the rows of the classifier's
    weight differ, else ``""`` (a mismatch elsewhere says nothing about the number of classes)."""
    key = f"{classifier}.weight"
    expected, given = model.state_dict().get(key), state.get(key)
    if expected is None or given is None or expected.ndim != 2 or given.ndim != 2:
        return ""
    if expected.shape[0] == given.shape[0]:
        return ""
    return (
        f"The checkpoint's classifier {classifier!r} has {given.shape[0]} classes and the architecture "
        f"{expected.shape[0]}."
    )


def classifier_rows(state: StateDict, key: str) -> int | None:
    """The number of classes a checkpoint's classifier weight ``key`` has, if present and 2-D."""
    weight = state.get(key)
    return int(weight.shape[0]) if weight is not None and weight.ndim == 2 else None


def last_linear_name(model: nn.Module) -> str | None:
    """The dotted name of the last ``nn.Linear`` (usually the classifier)."""
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    return names[-1] if names else None
