"""Compact in-memory loss / LR history for plotting (24 bytes per step: a million steps is 24 MB)."""

from __future__ import annotations

import math
from array import array
from collections.abc import Iterable


def _num(v: object) -> float:
    try:
        return float(v)
    except (TypeError, ValueError, OverflowError):  # missing or non-numeric values; an integer beyond a float
        return math.nan


class LossHistory:
    """Train (step, loss, lr) and eval (step, loss) series, in the order reported."""

    def __init__(self) -> None:
        self.steps, self.loss, self.lr = array("q"), array("d"), array("d")
        self.eval_steps, self.eval_loss = array("q"), array("d")

    def add_step(self, step: int, loss: float, lr: float | None) -> None:
        self.steps.append(int(step))
        self.loss.append(_num(loss))
        self.lr.append(_num(lr))

    def add_eval(self, step: int, loss: float) -> None:
        self.eval_steps.append(int(step))
        self.eval_loss.append(_num(loss))

    def __bool__(self) -> bool:
        return bool(self.steps or self.eval_steps)

    @classmethod
    def from_records(cls, steps: Iterable[dict], evals: Iterable[dict]) -> LossHistory:
        """From JSONL step / eval records (`read_log`)."""
        h = cls()
        for r in steps:
            h.add_step(r["step"], r["loss"], r.get("lr"))
        for r in evals:
            h.add_eval(r["step"], r["loss"])
        return h
