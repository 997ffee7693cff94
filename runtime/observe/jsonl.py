"""The `log_file`: one JSON object per line, flushed on every write so a killed run keeps its log."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from surogate.errors import UserError


def _clean(value: object) -> object:
    """JSON has no NaN/Inf: write them as strings so every line stays valid JSON. numpy scalars and
    0-d torch tensors become Python numbers; anything else unknown becomes its str()."""
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


class JsonlWriter:
    """Appends records `{"type": ..., "time": ..., **fields}` to `path` (appending keeps a resumed run's
    earlier lines; `read_log` keeps the last record per step).

    A file whose last line is torn (a run killed mid-write) is repaired first, so the records appended after it
    stay on lines of their own: a fragment that is not a JSON object is cut off, a whole record that only lacks
    its newline gets it. `repaired` then says what was done (the observer warns with it), else it is None."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.repaired = _repair_torn_tail(self.path)
            self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - lives as long as the run
        except OSError as exc:
            raise UserError(f"log_file: cannot open {self.path} for writing: {exc.strerror or exc}") from exc

    def write(self, type_: str, **fields: object) -> dict:
        record = {"type": type_, "time": round(time.time(), 3), **fields}
        self._fh.write(json.dumps(_clean(record), separators=(",", ":")) + "\n")
        self._fh.flush()
        return record

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()


_TAIL_SCAN = 1 << 20  # a torn line longer than this is cut at this many bytes from the end of the file


def _repair_torn_tail(path: Path) -> str | None:
    """End `path` with a newline before appending to it (see `JsonlWriter`); what was done, or None."""
    if not path.is_file():
        return None
    with open(path, "rb+") as fh:
        size = fh.seek(0, os.SEEK_END)
        if size == 0:
            return None
        fh.seek(max(0, size - _TAIL_SCAN))
        tail = fh.read()
        if tail.endswith(b"\n"):
            return None
        start = size - len(tail) + tail.rfind(b"\n") + 1  # where the last line begins (0 for a one-line file)
        fragment = tail[tail.rfind(b"\n") + 1:]
        line = (path.read_text(encoding="utf-8", errors="replace").count("\n") + 1) if size < _TAIL_SCAN else None
        where = f"{path}:{line}" if line else str(path)
        try:
            whole = isinstance(json.loads(fragment.decode("utf-8")), dict)
        except (UnicodeDecodeError, ValueError, RecursionError):
            whole = False
        if whole:
            fh.write(b"\n")
            return f"{where}: the last record had no newline (an interrupted run); one was added before appending"
        fh.truncate(start)
        if start > 0 and start == size - len(tail):  # no line start within the scanned tail: end what is left
            fh.seek(start)
            fh.write(b"\n")
        return (f"{where}: removed a torn last line ({len(fragment)} bytes, an interrupted write) before appending: "
                f"{fragment[:60].decode('utf-8', errors='replace')!r}{'...' if len(fragment) > 60 else ''}")


@dataclass
class LogData:
    """Series read back from a log: per-step train records and eval records, ordered by step."""

    steps: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # `file:line: why` of each line left out (skip_bad)
    superseded: int = 0  # step/eval records a later run's start went back over (see `read_log`)


def _problem(rec: object) -> str | None:
    """Why a parsed line is not a usable record, or None."""
    if not isinstance(rec, dict) or "type" not in rec:
        return "expected a JSON object with a \"type\" field"
    kind = rec["type"]
    if kind in ("step", "eval"):
        step = rec.get("step")
        if not isinstance(step, int) or isinstance(step, bool) or "loss" not in rec:
            return f"{kind} record needs an integer \"step\" and a \"loss\""
        if not 0 <= step < 2**63:
            return f"{kind} record's step {step} is out of range"
    return None


def read_log(path: str | os.PathLike, skip_bad: bool = False) -> LogData:
    """Parse a JSONL training log; UserError naming the file and line for anything malformed, or with `skip_bad`
    such lines are left out and listed in `skipped` (`file:line: why`) for the caller to warn about.

    When a step appears twice (a resumed run appends to the same file) the later record wins, and a run's
    `start` record with `first_step` S (0 for a fresh start, the checkpoint's step for a resume) supersedes
    every earlier record past S: the steps a resumed or restarted run goes back over are that run's, even
    where it stops before reaching them again. The lines stay in the file; `superseded` counts them.
    """
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: log file not found")
    steps: dict[int, dict] = {}
    evals: dict[int, dict] = {}
    events: list[dict] = []
    skipped: list[str] = []
    superseded = 0
    with open(p, encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                problem = _problem(rec)
            except json.JSONDecodeError as exc:
                problem = f"not valid JSON ({exc.msg})"
            except RecursionError:
                problem = "not valid JSON (nested too deeply)"
            if problem:
                if not skip_bad:
                    raise UserError(f"{p}:{lineno}: {problem}")
                skipped.append(f"{p}:{lineno}: {problem}")
                continue
            kind = rec["type"]
            first = rec.get("first_step") if kind == "start" else None
            if isinstance(first, int) and not isinstance(first, bool):
                for series in (steps, evals):
                    for step in [k for k in series if k > first]:
                        del series[step]
                        superseded += 1
            if kind in ("step", "eval"):
                (steps if kind == "step" else evals)[rec["step"]] = rec
            else:
                events.append(rec)
    return LogData(
        steps=[steps[k] for k in sorted(steps)], evals=[evals[k] for k in sorted(evals)], events=events,
        skipped=skipped, superseded=superseded,
    )
