"""Plateau warning: the training loss stopped improving over a rolling window (always on, no action)."""

from __future__ import annotations

import math
from collections import deque
from itertools import islice

from surogate.runtime.observe.diagnostics._state import load_fields, save_fields
from surogate.runtime.observe.diagnostics._stats import mean, pstdev

_STATE = ("_losses", "on_plateau", "_clear_steps")  # what `state()` saves

class PlateauDetector:
    """Warns when the mean of the last `window` losses is not clearly below the mean of the `window`
    losses before them.

    improvement = (mean(older) - mean(newer)) / |mean(older)|; threshold = max(`min_improvement` (1%),
    3 x se), se = sqrt(var(older) / window + var(newer) / window) / |mean(older)| (the relative standard
    error of the difference). Plateau when improvement < threshold: on a noisy loss a small improvement
    that noise could explain does not count as progress.

    Needs 2 x `window` finite losses, so the earliest warning is at the 2*window-th step reported.
    Warns once per plateau: after a warning it stays quiet until the condition has been false for
    `window` consecutive steps (noise around the threshold does not repeat the warning).
    """

    def __init__(self, window: int = 100, min_improvement: float = 0.01):
        self.window = window
        self.min_improvement = min_improvement
        self._losses: deque[float] = deque(maxlen=2 * window)
        self.on_plateau = False
        self._clear_steps = 0

    def improvement(self) -> tuple[float, float] | None:
        """(relative improvement, plateau threshold), or None without enough history."""
        if len(self._losses) < 2 * self.window:
            return None
        older = list(islice(self._losses, 0, self.window))
        newer = list(islice(self._losses, self.window, 2 * self.window))
        ref = max(abs(mean(older)), 1e-12)
        se = math.sqrt((pstdev(older) ** 2 + pstdev(newer) ** 2) / self.window) / ref
        return (mean(older) - mean(newer)) / ref, max(self.min_improvement, 3 * se)

    def update(self, step: int, loss: float) -> str | None:
        """Add one finite loss; return a warning message when a plateau starts, else None."""
        self._losses.append(float(loss))
        result = self.improvement()
        plateau = result is not None and result[0] < result[1]
        self._clear_steps = 0 if plateau else self._clear_steps + 1
        started = plateau and not self.on_plateau
        if started:
            self.on_plateau = True
        elif self.on_plateau and self._clear_steps >= self.window:
            self.on_plateau = False
        if not started:
            return None
        imp, threshold = result
        return (
            f"loss plateau at step {step}: the mean loss of the last {self.window} steps improved by "
            f"{imp * 100:.2f}% on the {self.window} steps before (needs {threshold * 100:.2f}%: the larger "
            f"of {self.min_improvement * 100:g}% and 3 standard errors of the noise)"
        )

    def state(self) -> dict:
        """The fields `update` reads and writes, as JSON (saved in checkpoints)."""
        return save_fields(self, _STATE)

    def load(self, state: dict) -> None:
        """Continue from `state()` of an earlier run."""
        load_fields(self, state, _STATE)
