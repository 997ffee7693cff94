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
    earlier lines; `read_log` keeps the last record per step)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
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


@dataclass
class LogData:
    """Series read back from a log: per-step train records and eval records, ordered by step."""

    steps: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)


def read_log(path: str | os.PathLike) -> LogData:
    """Parse a JSONL training log; UserError naming the file and line for anything malformed.

    When a step appears twice (a resumed run appends to the same file) the later record wins.
    """
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: log file not found")
    steps: dict[int, dict] = {}
    evals: dict[int, dict] = {}
    events: list[dict] = []
    with open(p, encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{p}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(rec, dict) or "type" not in rec:
                raise UserError(f"{p}:{lineno}: expected a JSON object with a \"type\" field")
            kind = rec["type"]
            if kind in ("step", "eval"):
                step = rec.get("step")
                if not isinstance(step, int) or isinstance(step, bool) or "loss" not in rec:
                    raise UserError(f"{p}:{lineno}: {kind} record needs an integer \"step\" and a \"loss\"")
                if not 0 <= step < 2**63:
                    raise UserError(f"{p}:{lineno}: {kind} record's step {step} is out of range")
                (steps if kind == "step" else evals)[rec["step"]] = rec
            else:
                events.append(rec)
    return LogData(
        steps=[steps[k] for k in sorted(steps)], evals=[evals[k] for k in sorted(evals)], events=events
    )
