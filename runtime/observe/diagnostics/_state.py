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


class StateValueError(ValueError):
    """A saved detector field of the wrong type (a hand-edited checkpoint): `field` (dotted), what was `expected`,
    what was `found`."""

    def __init__(self, field: str, expected: str, found: Any) -> None:
        super().__init__(f"{field}: expected {expected}, found {found!r}")
        self.field, self.expected, self.found = field, expected, found


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def checked(value: Any, current: Any, name: str, enum: type[Enum] | None = None) -> Any:
    """`value` for field `name` when it has the kind of the field's `current` value (lists and deques of numbers,
    numbers, flags, enum values; None where the field may be None); StateValueError otherwise."""
    if enum is not None:
        if value is None or value in {e.value for e in enum}:
            return None if value is None else enum(value)
        raise StateValueError(name, f"one of {sorted(e.value for e in enum)} or null", value)
    if isinstance(current, (deque, list)):
        if not isinstance(value, list) or not all(_number(v) for v in value):
            raise StateValueError(name, "a list of numbers", value)
        return value
    if isinstance(current, bool):
        if not isinstance(value, bool):
            raise StateValueError(name, "true or false", value)
        return value
    if isinstance(current, int):
        if not isinstance(value, int) or isinstance(value, bool):
            raise StateValueError(name, "an integer", value)
        return value
    if not (_number(value) or value is None and current is None):
        raise StateValueError(name, "a number" + (" or null" if current is None else ""), value)
    return value


def load_fields(obj: Any, state: dict, names: tuple[str, ...], enums: dict[str, type[Enum]] | None = None) -> None:
    """Set `names` of `obj` from `save_fields`' output (deques keep their maxlen; `enums`: fields to rebuild), each
    value checked against the field's kind (`checked`): nothing of a wrong type is set."""
    enums = enums or {}
    if not isinstance(state, dict):
        raise StateValueError("", "an object", state)
    values = {name: checked(state[name], getattr(obj, name), name, enums.get(name)) for name in names if name in state}
    for name, value in values.items():
        current = getattr(obj, name)
        if isinstance(current, deque):
            current.clear()
            current.extend(value)
        elif isinstance(current, list):
            setattr(obj, name, list(value))
        else:
            setattr(obj, name, value)
