"""``torchscript:FILE`` and ``python:FILE.py:FUNC`` models.

TorchScript archives load with ``torch.jit.load``. PyTorch runs no forward hooks inside scripted modules, so the
engine reads their layers from the scripted graph instead (:mod:`finercam.torchscript`).

A Python factory file is imported by path (it runs as ordinary Python code: only use files you trust) and
``FUNC()`` must return an ``nn.Module``; ``num_classes`` is passed when given and the function accepts it. A
``class_names`` attribute on the returned module is used as the class names.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import sys
from pathlib import Path

import torch
from torch import nn

from finercam.errors import InvalidArgumentError, ModelLoadError, ModelNotFoundError, WeightsError
from finercam.models.parts import ClassifierParts
from finercam.models.preprocess import PREPROCESS_PRESETS, Preprocess, with_name
from finercam.models.weights import existing_file, load_into, read_state_dict


def _default_preprocess(kind: str) -> Preprocess:
    return with_name(PREPROCESS_PRESETS["imagenet"], f"imagenet (default for {kind} models)")


def _class_names(model: nn.Module, source: str) -> tuple[str, ...] | None:
    """The model's ``class_names`` attribute, checked against its classifier's outputs when they can be read.

    Raises:
        InvalidArgumentError: the names are not as many as the outputs of the model's last layer, a linear one.
    """
    names = getattr(model, "class_names", None)
    if not (isinstance(names, list | tuple) and names and all(isinstance(n, str) for n in names)):
        return None
    outputs = _classifier_outputs(model)
    if outputs is not None and outputs[1] != len(names):
        raise InvalidArgumentError(
            f"{source}: the model's class_names has {len(names)} names but its classifier {outputs[0]!r} has "
            f"{outputs[1]} outputs; give one name per output, in class-index order"
        )
    return tuple(names)


def _classifier_outputs(model: nn.Module) -> tuple[str, int] | None:
    """``(name, rows)`` of the model's last module with parameters when it is linear (eager or TorchScript)."""
    last = None
    for name, module in model.named_modules():
        if any(True for _ in module.parameters(recurse=False)):
            last = (name, module)
    if last is None:
        return None
    name, module = last
    linear = isinstance(module, nn.Linear) or getattr(module, "original_name", None) == "Linear"
    weight = getattr(module, "weight", None)
    if not linear or not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return None
    return name, int(weight.shape[0])


def load_torchscript(path: str, weights: Path | None) -> ClassifierParts:
    """A TorchScript archive as the classifier."""
    file = existing_file(path, "TorchScript file")
    try:
        model = torch.jit.load(str(file), map_location="cpu")
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise WeightsError(
            f"{str(path)!r} is not a TorchScript archive (torch.jit.load: {first}). A state dict needs an "
            "architecture: e.g. timm:NAME with weights=FILE, or python:FILE.py:FUNC"
        ) from None
    if weights is not None:
        load_into(model, read_state_dict(weights), f"weights file {str(weights)!r}")
    return ClassifierParts(model, _default_preprocess("TorchScript"), _class_names(model, f"torchscript:{path}"), None)


def _import_file(file: Path) -> object:
    digest = hashlib.sha1(str(file.resolve()).encode()).hexdigest()[:12]
    module_name = f"finercam_user_model_{file.stem}_{digest}"
    spec = importlib.util.spec_from_file_location(module_name, file)
    if spec is None or spec.loader is None:
        raise InvalidArgumentError(f"{str(file)!r} cannot be imported as a Python module (is it a .py file?)")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickling inside the file need it registered
    try:
        spec.loader.exec_module(module)
    except Exception as error:
        del sys.modules[module_name]
        raise ModelLoadError(f"importing {str(file)!r} failed: {type(error).__name__}: {error}") from error
    return module


def build_from_python(path: str, factory: str, num_classes: int | None) -> nn.Module:
    """Import ``path`` and call ``factory`` (passing ``num_classes`` when given).

    Raises:
        ModelFileNotFoundError, ModelNotFoundError, ModelLoadError, InvalidArgumentError: with the reason.
    """
    file = existing_file(path, "Python model file")
    module = _import_file(file)
    function = getattr(module, factory, None)
    if not callable(function):
        available = sorted(
            n for n, v in vars(module).items()
            if callable(v) and not n.startswith("_") and getattr(v, "__module__", None) == module.__name__  # type: ignore[attr-defined]
        )
        raise ModelNotFoundError(f"{str(path)!r} defines no function {factory!r}; it defines {available}")
    kwargs: dict[str, object] = {}
    if num_classes is not None:
        try:
            accepts = "num_classes" in inspect.signature(function).parameters
        except (TypeError, ValueError):
            accepts = False
        if not accepts:
            raise InvalidArgumentError(f"num_classes was given but {factory}() in {str(path)!r} takes no num_classes")
        kwargs["num_classes"] = num_classes
    try:
        model = function(**kwargs)
    except Exception as error:
        raise ModelLoadError(f"{factory}() from {str(path)!r} raised {type(error).__name__}: {error}") from error
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"{factory}() from {str(path)!r} returned {type(model).__name__}; expected an nn.Module")
    return model


def load_python(path: str, factory: str, weights: Path | None, num_classes: int | None) -> ClassifierParts:
    """A classifier built by a function in a Python file."""
    model = build_from_python(path, factory, num_classes)
    if weights is not None:
        load_into(model, read_state_dict(weights), f"weights file {str(weights)!r}")
    return ClassifierParts(model, _default_preprocess("python"), _class_names(model, f"python:{path}:{factory}"), None)
