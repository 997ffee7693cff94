"""`auto_lr_reduction`: permanently halve the LR on loss spikes or gradient explosions."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from surogate.runtime.observe.diagnostics._state import StateValueError, load_fields, save_fields
from surogate.runtime.observe.diagnostics._stats import mean, pstdev

_STATE = ("scale", "_losses", "_grads", "_pending")  # what `state()` saves, with the reductions


@dataclass(frozen=True)
class LRReduction:
    """One reduction: at `step`, the cumulative LR scale became `scale` because of `reason`."""

    step: int
    scale: float
    count: int
    reason: str


class AutoLRReducer:
    """Rolling-window anomaly detector that scales the LR schedule by `factor` (0.5), at most 5 times.

    Against the last `window` (50) normal steps:
    - loss spike: loss > mean + 3 * sigma on `confirm` (2) consecutive steps, with
      sigma = max(population std, 1e-3 * |mean|) so that a perfectly flat loss does not turn rounding
      noise into a spike. One step above 3 sigma happens by chance about once in 740 steps of Gaussian
      noise (a long run would halve its LR five times for nothing); two in a row about once in 550,000,
      while a real spike lasts several steps. Steps awaiting confirmation stay out of the window so they
      do not inflate the sigma they are judged against;
    - gradient explosion: grad_norm > 10 x mean(grad_norm), on a single step (noise never does that).
    Detection starts once `min_history` (20) values are in the window. After a reduction the detector
    waits `cooldown` (20) steps, so one spike lasting a few steps costs one reduction, not five. Every
    step enters the window once judged, so a lasting level shift becomes the new normal.
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
        confirm: int = 2,
    ):
        self.min_history = min_history
        self.sigmas = sigmas
        self.grad_ratio = grad_ratio
        self.factor = factor
        self.max_reductions = max_reductions
        self.cooldown = cooldown
        self.confirm = confirm
        self._losses: deque[float] = deque(maxlen=window)
        self._grads: deque[float] = deque(maxlen=window)
        self._pending: list[float] = []  # consecutive high losses awaiting confirmation
        self.scale = 1.0
        self.reductions: list[LRReduction] = []

    def _loss_limit(self) -> tuple[float, float] | None:
        if len(self._losses) < self.min_history:
            return None
        m = mean(self._losses)
        return m, m + self.sigmas * max(pstdev(self._losses), 1e-3 * abs(m))

    def _grad_anomaly(self, grad_norm: float | None) -> str | None:
        if grad_norm is None or len(self._grads) < self.min_history:
            return None
        g = mean(self._grads)
        if g > 0 and grad_norm > self.grad_ratio * g:
            return f"gradient explosion: grad_norm {grad_norm:.4g} > {self.grad_ratio:g} x average {g:.4g}"
        return None

    def update(self, step: int, loss: float, grad_norm: float | None = None) -> LRReduction | None:
        """Add one finite step; return the reduction it triggered, if any."""
        loss = float(loss)
        limit = self._loss_limit()
        high = limit is not None and loss > limit[1]
        reason = self._grad_anomaly(grad_norm)
        if high:
            self._pending.append(loss)
            if reason is None and len(self._pending) >= self.confirm:
                reason = (f"loss spike: {self.confirm} steps above mean {limit[0]:.4g} + {self.sigmas:g} sigma "
                          f"({limit[1]:.4g}), last {loss:.4g}")
        event = None
        cooling = self.reductions and step - self.reductions[-1].step <= self.cooldown
        if reason is not None and len(self.reductions) < self.max_reductions and not cooling:
            self.scale *= self.factor
            event = LRReduction(step, self.scale, len(self.reductions) + 1, reason)
            self.reductions.append(event)
        if not high or event is not None or len(self._pending) >= self.confirm:
            self._losses.extend(self._pending if high else [*self._pending, loss])
            self._pending = []
        if grad_norm is not None:
            self._grads.append(float(grad_norm))
        return event

    def state(self) -> dict:
        """Everything `update` depends on, as JSON (saved in checkpoints: a resumed run decides as an
        uninterrupted one would, and keeps its reduced scale)."""
        return {**save_fields(self, _STATE), "reductions": [vars(r) for r in self.reductions]}

    def load(self, state: dict) -> None:
        """Continue from `state()` of an earlier run."""
        load_fields(self, state, _STATE)
        if not 0 < self.scale <= 1:
            raise StateValueError("scale", "a number in (0, 1]", self.scale)
        reductions = state.get("reductions")
        kinds = {"step": int, "scale": (int, float), "count": int, "reason": str}
        if not isinstance(reductions, list) or not all(
                isinstance(r, dict) and set(r) == set(kinds) and all(isinstance(r[k], t) and not isinstance(r[k], bool)
                                                                     for k, t in kinds.items()) for r in reductions):
            raise StateValueError("reductions", "a list of {step, scale, count, reason} objects", reductions)
        self.reductions = [LRReduction(**r) for r in reductions]
