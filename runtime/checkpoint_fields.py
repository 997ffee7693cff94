"""Checked reads of a checkpoint's state.json: a value of the wrong type or range is a UserError naming the file and
the field (a hand edit whose manifest hashes were made to match must not become a traceback, or a silently wrong
counter, later in the resumed run)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from surogate.errors import UserError

STATE_FILE = "state.json"
_MISSING = object()  # a state.json field that is not there


class StateFields:
    """Reads fields of a checkpoint's state.json, each checked: a value of the wrong type or range (a hand edit whose
    manifest hashes were made to match) is a UserError naming the file and the field, never a traceback later."""

    def __init__(self, path: Path, doc: Any = None, prefix: str = "") -> None:
        self.path, self.doc, self.prefix = Path(path), doc, prefix

    def error(self, key: str, expected: str, value: Any, found: str | None = None) -> UserError:
        field = f"{self.prefix}.{key}" if self.prefix else key
        found = found or ("nothing (missing)" if value is _MISSING else repr(value)[:80])
        return UserError(f"{self.path / STATE_FILE}: {field}: expected {expected}, found {found}. The file was edited or "
                         f"damaged after the save: restore it from a copy, or remove this checkpoint (rm -r {self.path}) "
                         "to resume from an earlier one")

    def _get(self, key: str, default: Any) -> Any:
        value = self.doc.get(key, _MISSING) if isinstance(self.doc, dict) else _MISSING
        return default if value is _MISSING and default is not _MISSING else value

    def integer(self, key: str, low: int = 0, high: int | None = None, default: Any = _MISSING) -> int:
        value = self._get(key, default)
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= low and (high is None or value <= high)
        if not ok:
            raise self.error(key, f"an integer from {low}" + (f" to {high}" if high is not None else ""), value)
        return value

    def positive(self, key: str, default: Any = _MISSING) -> float:
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
            raise self.error(key, "a positive number", value)
        return float(value)

    def mapping(self, key: str, default: Any = _MISSING) -> StateFields:
        value = self._get(key, default)
        if not isinstance(value, dict):
            raise self.error(key, "an object", value)
        return StateFields(self.path, value, f"{self.prefix}.{key}" if self.prefix else key)
