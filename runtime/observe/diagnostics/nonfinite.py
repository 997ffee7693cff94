"""Non-finite loss / gradient bookkeeping: skip the step, stop after repeated occurrences."""

from __future__ import annotations

import math


class NonFiniteGuard:
    """Counts skipped steps (NaN/Inf loss or gradients) and decides when to give up.

    The loop calls the observer once per skipped step. Training stops when `max_consecutive` (3) steps in
    a row were skipped, or `max_total` (10) steps were skipped over the whole run: a few isolated bad
    batches are tolerated, a persistent NaN means the weights or the LR are broken and the last good
    state should be saved. Any applied (finite) step resets the consecutive count.
    """

    def __init__(self, max_consecutive: int = 3, max_total: int = 10):
        self.max_consecutive = max_consecutive
        self.max_total = max_total
        self.consecutive = 0
        self.total = 0

    @staticmethod
    def is_finite(*values: float | None) -> bool:
        return all(v is None or math.isfinite(v) for v in values)

    def record(self, step: int, micro_batch: int | None, what: str) -> tuple[str, str | None]:
        """Count one skipped step; return (warning message, stop reason or None)."""
        self.consecutive += 1
        self.total += 1
        where = f"step {step}" + (f", micro-batch {micro_batch}" if micro_batch is not None else "")
        msg = (
            f"non-finite {what} at {where}: update skipped "
            f"({self.consecutive} in a row, {self.total} in total)"
        )
        reason = None
        if self.consecutive >= self.max_consecutive:
            reason = f"{self.consecutive} consecutive steps with non-finite {what} (last at {where})"
        elif self.total >= self.max_total:
            reason = f"{self.total} steps with non-finite loss/gradients in total (last at {where})"
        return msg, reason

    def ok(self) -> None:
        """A finite step was applied."""
        self.consecutive = 0
