"""Judging a training run that cannot train (runtime/session.py): why it failed, in words that name the cause
(the starting weights, the checkpoint resumed from, or the last applied update) and what it leaves to resume from.
A failed run exports nothing and exits 1."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from surogate.runtime.trainer import Trainer


def _steps_text(steps: list[int]) -> str:
    shown = ", ".join(str(s) for s in steps[:8])
    return f"step{'s' if len(steps) > 1 else ''} {shown}" + (f" and {len(steps) - 8} more" if len(steps) > 8 else "")


def broken_weights(trainer: Trainer, cfg: Any, latest: Path | None) -> str:
    """Why the weights hold NaN/Inf: the last applied update, the checkpoint resumed from, or the starting weights."""
    if trainer.last_applied is not None:
        return (f"the update of step {trainer.last_applied} (the last one applied) left them so: learning_rate "
                f"{float(cfg.learning_rate):g} is likely too high")
    if latest is not None:
        return f"they were so in the checkpoint resumed from, {latest}"
    adapter = f" or adapter_path {cfg.adapter_path}" if getattr(cfg, "adapter_path", None) else ""
    return f"the starting weights loaded from model {cfg.model}{adapter} hold NaN/Inf values: fix or replace them"


def failure_checkpoints(trainer: Trainer, good_state: Path | None) -> str:
    """What a failed run leaves to resume from: the last good state saved at the stop (`good_state`), or the
    checkpoints of this run that hold weights it found broken, or none (a run saves nothing before it applies a
    step)."""
    if good_state is not None:
        return f"; {good_state} holds the last good state (after step {trainer.last_applied})"
    broken = [p for p in trainer.saved if trainer.last_applied is not None
              and int(p.name.rsplit("-", 1)[1]) >= trainer.last_applied]
    if broken:
        names = ", ".join(str(p) for p in broken)
        return (f"; {names} hold{'s' if len(broken) == 1 else ''} these broken weights: a resume would start from "
                f"{'it' if len(broken) == 1 else 'the last'}; remove {'it' if len(broken) == 1 else 'them'}")
    return "; no checkpoint was written" if not trainer.saved else "; no checkpoint holds these weights"


def end_failure(trainer: Trainer, cfg: Any, result: Any, latest: Path | None,
                 start_applied: int) -> str | None:
    """Why a run that reached its end (or a stop) failed: no step of it was applied, or its weights are not finite;
    None when it did not fail. A run stopped by a signal keeps its state for the resume: it is not judged."""
    if result.signal is not None:
        return None
    if result.skipped and trainer.applied == start_applied:
        return (f"none of the {len(result.skipped)} step(s) of this run was applied: each had a non-finite loss or "
                f"gradients ({_steps_text(result.skipped)}); the model is not trained")
    if not trainer.weights_finite():
        return (f"at step {trainer.step} the model's weights hold NaN/Inf values: {broken_weights(trainer, cfg, latest)}; "
                "the model is not exported")
    return None
