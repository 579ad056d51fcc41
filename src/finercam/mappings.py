"""Comparing nested settings (JSON-like mappings), for the messages that refuse to resume or merge with other ones."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

SHOWN_CHARACTERS = 70


def differences(
    old: Mapping[str, Any], new: Mapping[str, Any], before: str = "was", after: str = "now", prefix: str = ""
) -> list[str]:
    """``"a.b: was OLD, now NEW"`` for every (nested) key whose value differs, in key order; long values are cut to
    :data:`SHOWN_CHARACTERS` characters. ``before`` and ``after`` name the two sides."""
    lines = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            lines += differences(a, b, before, after, f"{prefix}{key}.")
        elif a != b:
            shown = [_short(repr(value)) for value in (a, b)]
            lines.append(f"{prefix}{key}: {before} {shown[0]}, {after} {shown[1]}")
    return lines


def _short(text: str) -> str:
    return text if len(text) < SHOWN_CHARACTERS else text[: SHOWN_CHARACTERS - 3] + "..."
