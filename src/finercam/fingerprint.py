"""Fingerprints of the files that make a run's model (``--weights``, ``--head``, a ``torchscript:`` or ``python:``
file, a ``NAME@FILE`` checkpoint, the configuration and weight files of an ``hf:DIR`` folder): their size and
SHA-256, recorded in a result store's ``store.json`` (``config.model.fingerprints``) and in an evaluation's
``progress-config.json`` (``model.fingerprints``) so that neither is resumed with a model whose files changed since
(the path alone would not tell)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from finercam.errors import InvalidArgumentError, ModelNotFoundError

FINGERPRINTS = "fingerprints"
"""The key of ``config.model`` that holds them (stores made before it existed have none)."""
_BLOCK = 1 << 20


def file_fingerprint(path: str | Path) -> dict[str, int | str]:
    """``{"size": bytes, "sha256": hex digest}`` of one file, read in blocks of 1 MiB."""
    path = Path(path)
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as handle:
        while block := handle.read(_BLOCK):
            digest.update(block)
            size += len(block)
    return {"size": size, "sha256": digest.hexdigest()}


HF_ROLE = "hf:"
"""The prefix of the roles of an ``hf:DIR`` folder's files: ``hf:config.json``, ``hf:model.safetensors``."""
HF_FILES = ("config.json", "preprocessor_config.json", "*.safetensors", "*.bin")
"""The files of an ``hf:DIR`` folder that decide its outputs (tokenizers and model cards do not)."""


def _spec_files(spec: str) -> dict[str, Path]:
    """The local files a model spec names (the model file of ``torchscript:`` and ``python:``, an inline
    ``NAME@FILE`` checkpoint, the :data:`HF_FILES` of an ``hf:DIR`` folder, as roles ``hf:NAME``); hub names are not
    fingerprinted."""
    from finercam.models.spec import parse_spec

    try:
        parsed = parse_spec(spec)
    except (InvalidArgumentError, ModelNotFoundError):
        return {}
    files = {}
    if parsed.kind in ("torchscript", "python") and Path(parsed.name).is_file():
        files["model"] = Path(parsed.name)
    if parsed.weights is not None and Path(parsed.weights).is_file():
        files["checkpoint"] = Path(parsed.weights)
    if parsed.kind == "hf" and Path(parsed.name).is_dir():
        for pattern in HF_FILES:
            found = sorted(Path(parsed.name).glob(pattern))
            files.update((f"{HF_ROLE}{path.name}", path) for path in found if path.is_file())
    return files


def model_fingerprints(spec: str, weights: str | None = None, head: str | None = None) -> dict[str, dict]:
    """The fingerprint of every file of a model, by role (``model``, ``checkpoint``, ``weights``, ``head``); computed
    once per run."""
    files = _spec_files(spec)
    for role, given in (("weights", weights), ("head", head)):
        if given is not None and Path(given).is_file():
            files[role] = Path(given)
    return {role: file_fingerprint(path) for role, path in files.items()}
