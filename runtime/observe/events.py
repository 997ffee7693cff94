"""The records the training loop hands to the observer, and the decisions it gets back.

The loop fills these plain dataclasses; everything else (console, log file, trackers, detectors)
derives from them, so the loop never formats or decides anything itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import Enum


def _py(value: object) -> object:
    """numpy scalar / 0-d tensor -> Python number; anything else unchanged."""
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        return value.item()
    return value


def _py_dict(d: dict) -> dict:
    return {k: _py(v) for k, v in d.items()}


def _opt_float(value: object) -> float | None:
    return None if value is None else float(value)


class Phase(str, Enum):
    """Training phase as classified by `PhaseDetector` (shown in the step line, transitions logged)."""

    WARMUP = "WARMUP"
    CONVERGING = "CONVERGING"
    PLATEAU = "PLATEAU"
    UNSTABLE = "UNSTABLE"
    DIVERGING = "DIVERGING"


@dataclass(frozen=True)
class RunInfo:
    """Facts known before the first step (from the config, the plan and the data pipeline).

    `total_params` is the whole model (N in the 6N FLOPs/token and 20N Chinchilla figures);
    `trainable_params` is what the optimizer updates (LoRA: adapter parameters only).
    `notes` are printed under the start summary (e.g. the epoch-adjustment message).
    """

    model: str
    total_params: int
    trainable_params: int
    total_steps: int
    tokens_per_step: int = 0
    num_epochs: float = 1.0
    warmup_steps: int = 0
    dataset_rows: int | None = None
    dataset_tokens: int | None = None
    packing_efficiency: float | None = None
    plan_peak_bytes: int | None = None
    device: str | None = None
    start_step: int = 0
    notes: tuple[str, ...] = ()

    @property
    def planned_tokens(self) -> int:
        """Tokens the run will process: steps x tokens per optimizer step."""
        return self.total_steps * self.tokens_per_step


@dataclass(frozen=True)
class StepMetrics:
    """One optimizer step, reported after it was applied.

    `step` is 1-based (the number of optimizer updates done so far). `tokens` counts the tokens the step
    consumed on all devices (used for tokens/s and FLOPs). `step_time` is the wall time of the step in
    seconds; when omitted the observer measures the time between consecutive `on_step` calls.
    """

    step: int
    loss: float
    lr: float
    grad_norm: float | None = None
    tokens: int = 0
    epoch: float | None = None
    step_time: float | None = None
    extra: dict = field(default_factory=dict)

    def normalized(self) -> StepMetrics:
        """A copy holding plain Python numbers (the loop may pass numpy scalars or 0-d tensors)."""
        return replace(
            self, step=int(self.step), loss=float(self.loss), lr=float(self.lr), tokens=int(self.tokens),
            grad_norm=_opt_float(self.grad_norm), epoch=_opt_float(self.epoch),
            step_time=_opt_float(self.step_time), extra=_py_dict(self.extra),
        )


@dataclass(frozen=True)
class EvalMetrics:
    """One evaluation pass at optimizer step `step`."""

    step: int
    loss: float
    extra: dict = field(default_factory=dict)

    def normalized(self) -> EvalMetrics:
        """A copy holding plain Python numbers."""
        return replace(self, step=int(self.step), loss=float(self.loss), extra=_py_dict(self.extra))


@dataclass
class Decisions:
    """What the loop must do after an event.

    - `lr_scale`: the cumulative factor to multiply the scheduled LR by from now on (1.0 = unchanged).
    - `skip_step`: do not apply this step's update (non-finite loss or gradients); zero the gradients.
    - `stop`: end training now; `stop_reason` says why (already printed and logged).
    - `save_checkpoint`: save a final checkpoint before stopping (early stop: the current weights are
      good; non-finite stop: save the last good state, i.e. the weights before the skipped steps).
    """

    lr_scale: float = 1.0
    skip_step: bool = False
    stop: bool = False
    stop_reason: str | None = None
    save_checkpoint: bool = False


@dataclass(frozen=True)
class EndSummary:
    """What the loop knows at the end: artefact paths (adapter, merged model, ...) and final eval loss."""

    outputs: dict = field(default_factory=dict)
    final_eval_loss: float | None = None
    status: str = "completed"
