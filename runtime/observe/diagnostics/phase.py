"""Phase detection: WARMUP / CONVERGING / PLATEAU / UNSTABLE / DIVERGING from a rolling loss window."""

from __future__ import annotations

import math
from collections import deque
from itertools import islice

from surogate.runtime.observe.diagnostics._state import load_fields, save_fields
from surogate.runtime.observe.diagnostics._stats import (
    lag1_autocorrelation,
    mean,
    median,
    pstdev,
    rel_change,
    step_spread,
)
from surogate.runtime.observe.events import Phase


def phase_window(total_steps: int) -> int:
    """Window for a run of `total_steps`: a tenth of the run, between 20 and 100 steps, so a short
    fine-tune does not sit in WARMUP for its whole length and a long one gets a noise-robust window."""
    return min(100, max(20, total_steps // 10))


_STATE = ("_losses", "_grads", "phase", "steps_in_phase", "_candidate", "_candidate_steps")  # what `state()` saves


class PhaseDetector:
    """Classifies every step from the last `window` finite losses (and gradient norms).

    Definitions (A = older half of the window, B = newer half, r = (mean(B) - mean(A)) / |mean(A)|,
    se = sqrt(var(A)/|A| + var(B)/|B|) / |mean(A)| the relative standard error of that difference):

    - WARMUP: step <= `warmup_steps` (the LR warmup), or fewer than `window` losses seen yet.
    - DIVERGING: r > max(`diverge_tol`, 3 se): the loss rose by more than 5%, beyond its noise.
    - UNSTABLE: the loss noise is above `unstable_cv` (25%) of its level in B (std(B) / |mean(B)|) *and*
      it is not the steady batch-to-batch noise of a small batch on varied data: the step-to-step spread
      grew (in B more than `noise_growth` x that in A, trend removed by differencing) or the loss
      oscillates (lag-1 autocorrelation in B below -0.5, as when each step overshoots the last); or the
      largest gradient norm in B exceeds `spike_ratio` x the window's median gradient norm.
    - CONVERGING: r < -max(`converge_tol`, 3 se): the loss fell by more than 1%, beyond its noise.
    - PLATEAU: otherwise (no change distinguishable from noise, no instability).

    Rules are checked in that order. The 3-sigma margins keep per-step noise from flipping the phase
    (a flat noisy loss reads PLATEAU, not alternately CONVERGING and DIVERGING). The reported phase
    changes once a different classification has held for `dwell` (5) consecutive steps (leaving WARMUP
    is immediate), so a loss hovering at a threshold does not flood the log with transitions; the change
    is reported at the step that confirms it. `steps_in_phase` counts consecutive steps since the
    reported phase changed (early stopping reads it); `update` returns True in `changed` on a change.
    """

    def __init__(
        self,
        window: int = 100,
        warmup_steps: int = 0,
        converge_tol: float = 0.01,
        diverge_tol: float = 0.05,
        unstable_cv: float = 0.25,
        spike_ratio: float = 10.0,
        dwell: int = 5,
        noise_growth: float = 2.0,
    ):
        if window < 4:
            raise ValueError("window must be >= 4")
        self.window = window
        self.warmup_steps = warmup_steps
        self.converge_tol = converge_tol
        self.diverge_tol = diverge_tol
        self.unstable_cv = unstable_cv
        self.spike_ratio = spike_ratio
        self.noise_growth = noise_growth
        self._losses: deque[float] = deque(maxlen=window)
        self._grads: deque[float] = deque(maxlen=window)
        self.dwell = dwell
        self.phase: Phase | None = None
        self.steps_in_phase = 0
        self._candidate: Phase | None = None  # a different classification waiting to be confirmed
        self._candidate_steps = 0

    def classify(self, step: int) -> Phase:
        """The phase implied by the current window (no state change)."""
        if step <= self.warmup_steps or len(self._losses) < self.window:
            return Phase.WARMUP
        half = self.window // 2
        older = list(islice(self._losses, 0, self.window - half))
        newer = list(islice(self._losses, self.window - half, self.window))
        m_old, m_new = mean(older), mean(newer)
        r = rel_change(m_old, m_new)
        se = math.sqrt(pstdev(older) ** 2 / len(older) + pstdev(newer) ** 2 / len(newer)) / max(abs(m_old), 1e-12)
        if r > max(self.diverge_tol, 3 * se):
            return Phase.DIVERGING
        if self._noisy(older, newer, m_new) or self._grad_spike(half):
            return Phase.UNSTABLE
        if r < -max(self.converge_tol, 3 * se):
            return Phase.CONVERGING
        return Phase.PLATEAU

    def _noisy(self, older: list[float], newer: list[float], m_new: float) -> bool:
        """Loss noise above `unstable_cv` of its level that grew or oscillates (see the class doc)."""
        if pstdev(newer) / max(abs(m_new), 1e-12) <= self.unstable_cv:
            return False
        return step_spread(newer) > self.noise_growth * step_spread(older) or lag1_autocorrelation(newer) < -0.5

    def _grad_spike(self, half: int) -> bool:
        if len(self._grads) < self.window:
            return False
        ref = median(self._grads)
        newest = max(islice(self._grads, self.window - half, self.window))
        return ref > 0 and newest > self.spike_ratio * ref

    def update(self, step: int, loss: float, grad_norm: float | None = None) -> tuple[Phase, bool]:
        """Add one finite step; return (reported phase, changed)."""
        self._losses.append(float(loss))
        if grad_norm is not None:
            self._grads.append(float(grad_norm))
        raw = self.classify(step)
        if raw is self.phase:
            self._candidate, self._candidate_steps = None, 0
        elif self.phase in (None, Phase.WARMUP):
            return self._switch(raw)
        else:
            same = raw is self._candidate
            self._candidate, self._candidate_steps = raw, (self._candidate_steps + 1 if same else 1)
            if self._candidate_steps >= self.dwell:
                return self._switch(raw)
        self.steps_in_phase += 1
        return self.phase, False

    def _switch(self, phase: Phase) -> tuple[Phase, bool]:
        self.phase, self.steps_in_phase = phase, 1
        self._candidate, self._candidate_steps = None, 0
        return phase, True

    def state(self) -> dict:
        """The fields `update` reads and writes, as JSON (saved in checkpoints)."""
        return save_fields(self, _STATE)

    def load(self, state: dict) -> None:
        """Continue from `state()` of an earlier run."""
        load_fields(self, state, _STATE, {"phase": Phase, "_candidate": Phase})
