"""A detector's mutable fields as JSON and back, for checkpoints: a resumed run's detectors decide as an
uninterrupted run's would (same windows, streaks and counters). Thresholds come from the config, not from here."""

from __future__ import annotations

from collections import deque
from enum import Enum
from typing import Any


def save_fields(obj: Any, names: tuple[str, ...]) -> dict:
    """`names` of `obj` as JSON values (deques as lists, enums as their values)."""
    out = {}
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, deque):
            value = list(value)
        elif isinstance(value, Enum):
            value = value.value
        out[name] = value
    return out


def load_fields(obj: Any, state: dict, names: tuple[str, ...], enums: dict[str, type[Enum]] | None = None) -> None:
    """Set `names` of `obj` from `save_fields`' output (deques keep their maxlen; `enums`: fields to rebuild)."""
    enums = enums or {}
    for name in names:
        if name not in state:
            continue
        value, current = state[name], getattr(obj, name)
        if isinstance(current, deque):
            current.clear()
            current.extend(value)
        elif name in enums:
            setattr(obj, name, None if value is None else enums[name](value))
        elif isinstance(current, list):
            setattr(obj, name, list(value))
        else:
            setattr(obj, name, value)
