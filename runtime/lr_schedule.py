"""Learning-rate schedules: `linear`, `cosine`, `wsd`, with warmup, cooldown and a final-LR floor.

Steps are optimizer steps, 0-indexed, as in Hugging Face: step `s` of `total_steps` trains with
`lr_at(s, total_steps, cfg)`; warmup starts at 0 (the first step has LR 0 when warming up) and
`lr_at(total_steps)` is the final LR.

Phases (W = warmup steps, C = cooldown steps, T = total steps, floor = final_lr_fraction * lr):
- warmup   [0, W):    linear from 0 to lr.
- main     [W, T-C):  `linear`/`cosine` decay from lr towards floor over [W, T] (the curve HF uses,
                      with the floor of `get_cosine_with_min_lr_schedule_with_warmup`); `wsd` holds lr.
- cooldown [T-C, T]:  straight line from the LR reached at T-C down to floor at T. For `wsd` that is
                      lr -> floor (the decay phase); for `cosine` it replaces the flat tail of the cosine by a chord
                      (higher LR until the end, then linearly to the floor);
                      for `linear` it coincides with the decay line.
`warmup_steps` > 0 overrides `warmup_ratio`; the ratio becomes `ceil(ratio * T)` steps, as in HF.
"""

from __future__ import annotations

import math
from typing import Any

from surogate.errors import UserError

SCHEDULES = ("linear", "cosine", "wsd")


def warmup_steps_for(total_steps: int, cfg: Any) -> int:
    """Number of warmup steps: `warmup_steps` if > 0, else `ceil(warmup_ratio * total_steps)` (HF's rounding)."""
    steps = int(getattr(cfg, "warmup_steps", 0) or 0)
    if steps > 0:
        return steps
    ratio = float(getattr(cfg, "warmup_ratio", 0.0) or 0.0)
    return math.ceil(total_steps * ratio)


def _decay_factor(kind: str, step: int, warmup: int, total: int, floor: float) -> float:
    """Main-phase multiplier of lr (1 at `warmup`, `floor` at `total`)."""
    if kind == "wsd":
        return 1.0
    progress = min(1.0, max(0.0, (step - warmup) / max(1, total - warmup)))
    shape = 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return floor + (1.0 - floor) * shape


def lr_factor(step: int, total_steps: int, cfg: Any) -> float:
    """The schedule's multiplier of `learning_rate` at optimizer step `step` (see the module docstring)."""
    kind = getattr(cfg, "lr_scheduler_type", "linear") or "linear"
    if kind not in SCHEDULES:
        raise UserError(f"lr_scheduler_type: unknown schedule {kind!r}; expected one of {', '.join(SCHEDULES)}")
    if total_steps < 1:
        raise UserError(f"the LR schedule needs at least one training step, got total_steps={total_steps}")
    floor = float(getattr(cfg, "final_lr_fraction", 0.0) or 0.0)
    warmup = warmup_steps_for(total_steps, cfg)
    cooldown = int(getattr(cfg, "cooldown_steps", 0) or 0)
    if step < warmup:
        return step / max(1, warmup)
    cool_start = max(warmup, total_steps - cooldown)
    if cooldown > 0 and step >= cool_start:
        start = _decay_factor(kind, cool_start, warmup, total_steps, floor)
        progress = min(1.0, (step - cool_start) / max(1, total_steps - cool_start))
        return start + (floor - start) * progress
    return _decay_factor(kind, step, warmup, total_steps, floor)


def lr_at(step: int, total_steps: int, cfg: Any) -> float:
    """Learning rate at optimizer step `step` (0-indexed) of a run of `total_steps` steps."""
    return float(cfg.learning_rate) * lr_factor(step, total_steps, cfg)


class LRScheduler:
    """The schedule plus a position and a permanent multiplicative scale (`auto_lr_reduction`).

    Usage in the loop: `lr = sched.lr()` for the current step, then `sched.step()` after the update.
    `reduce()` halves the scale for good; `set_scale()` takes the observer's cumulative `lr_scale`.
    """

    def __init__(self, cfg: Any, total_steps: int, step: int = 0, scale: float = 1.0):
        lr_factor(0, total_steps, cfg)  # validates the schedule name and step count up front
        self.cfg = cfg
        self.total_steps = int(total_steps)
        self.current_step = int(step)
        self.scale = float(scale)
        self.reductions = 0

    def lr(self, step: int | None = None) -> float:
        """LR (scale applied) at `step`, default the current step."""
        s = self.current_step if step is None else step
        return lr_at(s, self.total_steps, self.cfg) * self.scale

    def step(self) -> None:
        self.current_step += 1

    def reduce(self, factor: float = 0.5) -> float:
        """Multiply the scale by `factor` permanently; returns the new scale."""
        self.scale *= factor
        self.reductions += 1
        return self.scale

    def set_scale(self, scale: float) -> None:
        """Adopt an externally tracked cumulative scale (e.g. `Decisions.lr_scale` from the observer)."""
        self.scale = float(scale)

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.current_step,
            "scale": self.scale,
            "reductions": self.reductions,
            "total_steps": self.total_steps,
            "schedule": getattr(self.cfg, "lr_scheduler_type", "linear"),
        }

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        """Restore position and scale. With `strict`, a different schedule name or length is an error
        (resuming would silently bend the LR curve); `strict=False` accepts a new length (extending a run)."""
        for key in ("step", "scale", "reductions", "total_steps", "schedule"):
            if key not in state:
                raise UserError(f"LR-schedule state is missing {key!r}; the checkpoint is incomplete")
        ours = getattr(self.cfg, "lr_scheduler_type", "linear")
        if state["schedule"] != ours:
            raise UserError(f"lr_scheduler_type: checkpoint was trained with {state['schedule']!r}, config says {ours!r}")
        if strict and int(state["total_steps"]) != self.total_steps:
            raise UserError(
                f"checkpoint LR schedule spans {state['total_steps']} steps but this run has {self.total_steps}; "
                "resume with the same max_steps / num_epochs / dataset"
            )
        self.current_step = int(state["step"])
        self.scale = float(state["scale"])
        self.reductions = int(state["reductions"])
