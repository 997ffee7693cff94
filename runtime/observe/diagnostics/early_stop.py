"""`early_stop`: multi-criteria early stopping (any criterion fires -> stop and save a final checkpoint)."""

from __future__ import annotations

from surogate.runtime.observe.diagnostics._state import load_fields, save_fields
from surogate.runtime.observe.diagnostics._stats import mean
from surogate.runtime.observe.events import Phase

_STATE = ("_last_eval", "convergence_streak", "last_score", "_interval_losses", "_interval_tokens",
          "_prev_interval_mean", "efficiencies", "peak_efficiency")  # what `state()` saves

class EarlyStopper:
    """Four independent criteria; the first to fire gives the stop reason.

    1. Convergence (per eval). With eval losses L[k-1], L[k] and r = (L[k-1] - L[k]) / |L[k-1]| the
       relative improvement, the convergence score is s = 1 - clip(r / `ref_improvement`, 0, 1):
       1.0 when the eval loss did not improve (or got worse), 0.0 when it improved by >= 1%.
       Fires when s > 0.85 (improvement < 0.15% per eval) for `patience` (5) consecutive evals.
    2. Compute efficiency (per step). Steps after `warmup_steps` are grouped in intervals of
       `efficiency_window` (100) steps. For each interval after the first,
       efficiency = (mean loss of previous interval - mean loss of this interval) / FLOPs of this interval,
       FLOPs = 6 x `total_params` x tokens of the interval (tokens as reported per step; 1 per step if the
       loop reports none, which keeps the ratio exact for constant-size steps). Peak = the highest
       efficiency so far. Fires at the end of an interval whose efficiency is < `efficiency_drop` (50%) of
       the peak, once at least 2 efficiencies were measured.
    3. Divergence: the phase detector has said DIVERGING for `diverge_steps` (200) consecutive steps.
    4. Plateau: the phase detector has said PLATEAU for `plateau_steps` (500) consecutive steps.
    """

    def __init__(
        self,
        total_params: int,
        warmup_steps: int = 0,
        convergence_threshold: float = 0.85,
        patience: int = 5,
        ref_improvement: float = 0.01,
        efficiency_window: int = 100,
        efficiency_drop: float = 0.5,
        diverge_steps: int = 200,
        plateau_steps: int = 500,
    ):
        self.flops_per_token = 6 * max(int(total_params), 1)
        self.warmup_steps = warmup_steps
        self.convergence_threshold = convergence_threshold
        self.patience = patience
        self.ref_improvement = ref_improvement
        self.efficiency_window = efficiency_window
        self.efficiency_drop = efficiency_drop
        self.diverge_steps = diverge_steps
        self.plateau_steps = plateau_steps
        self._last_eval: float | None = None
        self.convergence_streak = 0
        self.last_score: float | None = None
        self._interval_losses: list[float] = []
        self._interval_tokens = 0
        self._prev_interval_mean: float | None = None
        self.efficiencies: list[float] = []
        self.peak_efficiency: float | None = None

    # -- 1. convergence -------------------------------------------------------------------------------
    def convergence_score(self, prev: float, cur: float) -> float:
        r = (prev - cur) / max(abs(prev), 1e-12)
        return 1.0 - min(max(r / self.ref_improvement, 0.0), 1.0)

    def on_eval(self, step: int, eval_loss: float) -> str | None:
        """Feed one eval loss; return a stop reason or None."""
        prev, self._last_eval = self._last_eval, float(eval_loss)
        if prev is None:
            return None
        self.last_score = self.convergence_score(prev, eval_loss)
        self.convergence_streak = self.convergence_streak + 1 if self.last_score > self.convergence_threshold else 0
        if self.convergence_streak >= self.patience:
            return (
                f"converged: convergence score > {self.convergence_threshold} for {self.patience} consecutive "
                f"evals (eval loss {eval_loss:.4f} at step {step}, last score {self.last_score:.3f})"
            )
        return None

    # -- 2-4. per step --------------------------------------------------------------------------------
    def on_step(self, step: int, loss: float, tokens: int, phase: Phase, steps_in_phase: int) -> str | None:
        """Feed one finite step with the phase detector's verdict; return a stop reason or None."""
        if phase is Phase.DIVERGING and steps_in_phase >= self.diverge_steps:
            return f"diverging: loss rising for {steps_in_phase} consecutive steps (step {step})"
        if phase is Phase.PLATEAU and steps_in_phase >= self.plateau_steps:
            return f"plateau: no loss improvement for {steps_in_phase} consecutive steps (step {step})"
        if step > self.warmup_steps:
            return self._efficiency(step, loss, tokens)
        return None

    def _efficiency(self, step: int, loss: float, tokens: int) -> str | None:
        self._interval_losses.append(float(loss))
        self._interval_tokens += tokens if tokens > 0 else 1
        if len(self._interval_losses) < self.efficiency_window:
            return None
        cur = mean(self._interval_losses)
        flops = self.flops_per_token * self._interval_tokens
        prev, self._prev_interval_mean = self._prev_interval_mean, cur
        self._interval_losses, self._interval_tokens = [], 0
        if prev is None:
            return None
        eff = (prev - cur) / flops
        self.efficiencies.append(eff)
        self.peak_efficiency = eff if self.peak_efficiency is None else max(self.peak_efficiency, eff)
        peak = self.peak_efficiency
        if len(self.efficiencies) >= 2 and peak > 0 and eff < self.efficiency_drop * peak:
            return (
                f"compute efficiency fell to {eff / peak * 100:.1f}% of its peak "
                f"({eff:.3g} vs {peak:.3g} loss reduction per FLOP, 6N FLOPs/token) at step {step}"
            )
        return None

    def state(self) -> dict:
        """The fields `update` reads and writes, as JSON (saved in checkpoints)."""
        return save_fields(self, _STATE)

    def load(self, state: dict) -> None:
        """Continue from `state()` of an earlier run."""
        load_fields(self, state, _STATE)
