"""Resuming ``finercam evaluate``: which images an output folder already holds, and whether its options match.

``OUT/progress-config.json`` records the options and the data; ``OUT/progress.jsonl`` one line per finished batch,
each listing the indices of its images (``indices``). A rerun compares only what changes the per-image results: the
batch sizes (lowered after running out of memory) and ``correct_only`` (a filter of the summary) may change, and the
images left are batched with the new sizes. Any other difference is refused with the options that differ, old and
new (unless no image was finished: then there is nothing to keep).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from finercam import locking
from finercam.errors import InvalidArgumentError
from finercam.fingerprint import FINGERPRINTS
from finercam.mappings import differences

PROGRESS, PROGRESS_CONFIG = "progress.jsonl", "progress-config.json"
FREE_OPTIONS = ("batch_size", "score_batch_size", "correct_only")
"""Options that do not change per-image results, so a resumed evaluation may change them."""
FREE_SCORE_OPTIONS = ("pass_size",)
SCORE_OPTIONS_OF = {"ks": ("rd",), "steps": ("deletion", "insertion"), "tolerance": ("pointing",),
                    "fill": ("rd", "deletion", "insertion"), "fill_mean": ("rd", "deletion", "insertion"),
                    "fill_pixels": ("rd", "deletion", "insertion"), "blur_sigma": ("rd", "deletion", "insertion")}
"""The metric groups each score option affects: an option none of the computed groups uses may change on resume."""
_RESTART = "pass --restart to discard it, or choose another --out"


def comparable(options: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON view of ``asdict(EvaluationOptions)`` without the options a resumed evaluation may change (batch
    sizes, and score options of metric groups it does not compute)."""
    view = json.loads(json.dumps(options, default=str))
    metrics = set(view.get("score", {}).get("metrics", ()))
    score = {k: v for k, v in view.get("score", {}).items()
             if k not in FREE_SCORE_OPTIONS and metrics & set(SCORE_OPTIONS_OF.get(k, metrics))}
    return {**{k: v for k, v in view.items() if k not in FREE_OPTIONS}, "score": score}


def exclusive(out: Path) -> AbstractContextManager[None]:
    """Hold ``out/.lock`` while an evaluation writes to ``out`` (:func:`finercam.locking.exclusive`): a second one
    into the same folder is refused instead of appending the same images again."""
    return locking.exclusive(out, "finercam evaluate")


def read_progress(out: Path) -> list[dict[str, Any]]:
    """The finished batches in ``out/progress.jsonl``; a last line cut short by a crash is dropped (and truncated
    away so that appending goes on cleanly).

    Raises:
        InvalidArgumentError: another line is not a batch record (the file was edited or damaged), naming the line.
    """
    path = out / PROGRESS
    if not path.is_file():
        return []
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) != len(data):
        with path.open("r+b") as handle:
            handle.truncate(len(complete))
    records = []
    for number, line in enumerate(complete.decode(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise InvalidArgumentError(f"{str(path)!r} line {number} is not JSON ({error.msg}); {_RESTART}") from None
        missing = [key for key in ("batch", "images", "values", "skipped") if not isinstance(record, dict)
                   or key not in record]
        if missing or not isinstance(record["batch"], int):
            raise InvalidArgumentError(f"{str(path)!r} line {number} is not a batch record (it lacks "
                                       f"{missing or ['an integer batch']}); {_RESTART}")
        records.append(record)
    return records


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InvalidArgumentError(
            f"{str(path)!r} is not the JSON an evaluation writes ({error}); {_RESTART}"
        ) from None
    if not isinstance(config, dict) or not isinstance(config.get("options", {}), dict):
        raise InvalidArgumentError(f"{str(path)!r} is not the JSON an evaluation writes (no options); {_RESTART}")
    return config


def done_indices(records: list[dict[str, Any]], batch_size: int, total: int) -> set[int]:
    """The indices of the images the ``records`` hold (a record written before ``indices`` were recorded covers
    batch ``batch`` of ``batch_size`` images)."""
    done: set[int] = set()
    for record in records:
        if "indices" in record:
            done.update(record["indices"])
        else:
            start = record["batch"] * batch_size
            done.update(range(start, min(start + batch_size, total)))
    return done


def _older_fingerprints(previous: dict[str, Any], extra: Mapping[str, Any],
                        log: Callable[[str], None] | None) -> dict[str, Any]:
    """``previous`` as if it had recorded the run's model-file fingerprints, when it was made before they were
    (``log`` is told which files cannot be checked); otherwise ``previous`` itself."""
    model, now = previous.get("model"), (extra.get("model") or {}).get(FINGERPRINTS)
    if not isinstance(model, dict) or FINGERPRINTS in model or now is None:
        return previous
    if now and log is not None:
        log(f"the evaluation in the output folder predates model-file fingerprints: it cannot be checked that the "
            f"{', '.join(sorted(now))} file(s) are the ones it was made with; resume only with unchanged files")
    return {**previous, "model": {**model, FINGERPRINTS: now}}


def prepare_out(out: Path, options: Mapping[str, Any], extra: Mapping[str, Any], restart: bool, total: int,
                log: Callable[[str], None] | None = None) -> set[int]:
    """Create ``out``; unless ``restart``, check that what it holds was made with the same options (``asdict`` of the
    :class:`~finercam.evaluation.runner.EvaluationOptions`) and ``extra`` (the data, the model, and under
    ``model.fingerprints`` the size and SHA-256 of each model file, :func:`finercam.fingerprint.model_fingerprints`);
    write the options; return the indices of the images already evaluated.

    Raises:
        InvalidArgumentError: ``out`` holds an evaluation with other options, listing each difference.
    """
    out.mkdir(parents=True, exist_ok=True)
    config_path, progress_path = out / PROGRESS_CONFIG, out / PROGRESS
    record = {"options": json.loads(json.dumps(options, default=str)), **extra}
    done: set[int] = set()
    if restart:
        progress_path.unlink(missing_ok=True)
    elif progress_path.is_file():
        if not config_path.is_file():
            raise InvalidArgumentError(f"{str(out)!r} holds {PROGRESS} but not {PROGRESS_CONFIG}, so its options are "
                                       f"unknown; {_RESTART}")
        previous = _older_fingerprints(_read_config(config_path), extra, log)
        done = done_indices(read_progress(out), int(previous.get("options", {}).get("batch_size", 1)), total)
        changed = differences(comparable(previous.get("options", {})), comparable(record["options"]))
        changed += differences(_extra(previous, extra), _extra(record, extra))
        before = int(previous.get("images", total))  # the size of the evaluation held, which may differ from this
        held = done_indices(read_progress(out), int(previous.get("options", {}).get("batch_size", 1)), before)
        if changed and held:  # an evaluation stopped before its first batch holds nothing to keep
            state = "finished" if held >= set(range(before)) else "partial"
            raise InvalidArgumentError(
                f"{str(out)!r} holds a {state} evaluation ({len(held)} of {before} images done) with other options or "
                f"data: {'; '.join(changed[:8])}. "
                "Pass --restart to discard it, or choose another --out (batch sizes may change on resume)"
            )
    tmp = config_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str))
    os.replace(tmp, config_path)
    return done


def _extra(record: Mapping[str, Any], keys: Mapping[str, Any]) -> dict[str, Any]:
    return {key: record.get(key) for key in keys}
