"""`auto_lr_reduction`: permanently halve the LR on loss spikes or gradient explosions."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from surogate.runtime.observe.diagnostics._stats import mean, pstdev


@dataclass(frozen=True)
class LRReduction:
    """One reduction: at `step`, the cumulative LR scale became `scale` because of `reason`."""

    step: int
    scale: float
    count: int
    reason: str


class AutoLRReducer:
    """Rolling-window anomaly detector that scales the LR schedule by `factor` (0.5), at most 5 times.

    At each step, against the previous `window` (50) steps (excluding the current one):
    - loss spike: loss > mean + 3 * sigma, with sigma = max(population std, 1e-3 * |mean|) so that a
      perfectly flat loss does not turn rounding noise into a spike;
    - gradient explosion: grad_norm > 10 x mean(grad_norm).
    Detection starts once `min_history` (20) values are in the window. After a reduction the detector waits
    `cooldown` (20) steps, so one spike lasting a few steps costs one reduction, not five. The current step
    always enters the window afterwards (a lasting level shift becomes the new normal).
    """

    def __init__(
        self,
        window: int = 50,
        min_history: int = 20,
        sigmas: float = 3.0,
        grad_ratio: float = 10.0,
        factor: float = 0.5,
        max_reductions: int = 5,
        cooldown: int = 20,
    ):
        self.min_history = min_history
        self.sigmas = sigmas
        self.grad_ratio = grad_ratio
        self.factor = factor
        self.max_reductions = max_reductions
        self.cooldown = cooldown
        self._losses: deque[float] = deque(maxlen=window)
        self._grads: deque[float] = deque(maxlen=window)
        self.scale = 1.0
        self.reductions: list[LRReduction] = []

    def _anomaly(self, loss: float, grad_norm: float | None) -> str | None:
        if len(self._losses) >= self.min_history:
            m = mean(self._losses)
            sigma = max(pstdev(self._losses), 1e-3 * abs(m))
            limit = m + self.sigmas * sigma
            if loss > limit:
                return f"loss spike: {loss:.4g} > mean {m:.4g} + {self.sigmas:g} sigma ({limit:.4g})"
        if grad_norm is not None and len(self._grads) >= self.min_history:
            g = mean(self._grads)
            if g > 0 and grad_norm > self.grad_ratio * g:
                return f"gradient explosion: grad_norm {grad_norm:.4g} > {self.grad_ratio:g} x average {g:.4g}"
        return None

    def update(self, step: int, loss: float, grad_norm: float | None = None) -> LRReduction | None:
        """Add one finite step; return the reduction it triggered, if any."""
        event = None
        cooling = self.reductions and step - self.reductions[-1].step <= self.cooldown
        if len(self.reductions) < self.max_reductions and not cooling:
            reason = self._anomaly(loss, grad_norm)
            if reason is not None:
                self.scale *= self.factor
                event = LRReduction(step, self.scale, len(self.reductions) + 1, reason)
                self.reductions.append(event)
        self._losses.append(float(loss))
        if grad_norm is not None:
            self._grads.append(float(grad_norm))
        return event
