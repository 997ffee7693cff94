"""User-facing errors: anything caused by the user's input (config, data, files, hardware).

The CLI catches `UserError`, prints its message (no traceback) and exits with `exit_code` (2).
Raise it, or a subclass, for every problem a user can fix; let genuine bugs raise normally.
"""

from __future__ import annotations

from dataclasses import dataclass


class UserError(Exception):
    """An error the user can fix. Its message names the field, file, row or step at fault."""

    exit_code = 2


class RunFailedError(UserError):
    """A run that cannot go on for a reason the user can fix (a checkpoint that cannot be written: a full disk):
    exit 1, as a failed run, with its message and no traceback."""

    exit_code = 1


class NotAvailableError(UserError):
    """A command or feature whose engine has not landed yet, or needs hardware this machine lacks."""

    exit_code = 3


@dataclass(frozen=True)
class ConfigIssue:
    """One problem in a config: where (`path`, e.g. `datasets[1].instruction_field`), what was found, what is expected."""

    path: str
    message: str
    value: object = None
    line: int | None = None
    column: int | None = None
    source: str | None = None

    def location(self) -> str:
        if self.source and self.line is not None:
            return f"{self.source}:{self.line}:{self.column}"
        return self.source or ""

    def __str__(self) -> str:
        where = self.location()
        prefix = f"{where}: " if where else ""
        field = self.path or "<config>"
        return f"{prefix}{field}: {self.message}"

    def to_json(self) -> dict:
        return {
            "path": self.path,
            "message": self.message,
            "value": _jsonable(self.value),
            "file": self.source,
            "line": self.line,
            "column": self.column,
        }


def _jsonable(value: object) -> object:
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return repr(value)


class ConfigError(UserError):
    """A config that does not validate; carries every issue found, not just the first."""

    def __init__(self, issues: list[ConfigIssue]):
        self.issues = list(issues)
        lines = [f"{len(self.issues)} error(s) in config:"] + [f"  - {i}" for i in self.issues]
        super().__init__("\n".join(lines))
