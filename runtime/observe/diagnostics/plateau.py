"""Plateau warning: the training loss stopped improving over a rolling window (always on, no action)."""

from __future__ import annotations

from collections import deque
from itertools import islice

from surogate.runtime.observe.diagnostics._stats import mean


class PlateauDetector:
    """Warns when mean(last `window` losses) improved by less than `min_improvement` (relative) on
    mean(the `window` losses before them).

    Needs 2 x `window` finite losses, so the earliest warning is at the 2*window-th step reported.
    Warns once per plateau: after a warning it stays quiet until the condition has been false again.
    """

    def __init__(self, window: int = 100, min_improvement: float = 0.01):
        self.window = window
        self.min_improvement = min_improvement
        self._losses: deque[float] = deque(maxlen=2 * window)
        self.on_plateau = False

    def improvement(self) -> float | None:
        """Relative improvement of the newer window on the older one, or None without enough history."""
        if len(self._losses) < 2 * self.window:
            return None
        older = mean(list(islice(self._losses, 0, self.window)))
        newer = mean(list(islice(self._losses, self.window, 2 * self.window)))
        return (older - newer) / max(abs(older), 1e-12)

    def update(self, step: int, loss: float) -> str | None:
        """Add one finite loss; return a warning message when a plateau starts, else None."""
        self._losses.append(float(loss))
        imp = self.improvement()
        plateau = imp is not None and imp < self.min_improvement
        started = plateau and not self.on_plateau
        self.on_plateau = plateau
        if not started:
            return None
        return (
            f"loss plateau at step {step}: the mean loss of the last {self.window} steps improved by "
            f"{imp * 100:.2f}% (< {self.min_improvement * 100:g}%) on the {self.window} steps before"
        )
