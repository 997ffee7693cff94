"""Training diagnostics (always on) and automation (opt-in): pure state machines fed one step at a time.

Each detector is deterministic, holds only bounded history, and knows nothing about I/O; the
observer turns its outputs into log records, console lines and `Decisions`.
"""

from surogate.runtime.observe.diagnostics._state import StateValueError
from surogate.runtime.observe.diagnostics.budget import (
    EpochAdjustment,
    adjust_epochs,
    budget_line,
    chinchilla_tokens,
)
from surogate.runtime.observe.diagnostics.early_stop import EarlyStopper
from surogate.runtime.observe.diagnostics.lr_reduction import AutoLRReducer, LRReduction
from surogate.runtime.observe.diagnostics.nonfinite import NonFiniteGuard
from surogate.runtime.observe.diagnostics.phase import PhaseDetector, phase_window
from surogate.runtime.observe.diagnostics.plateau import PlateauDetector

__all__ = [
    "AutoLRReducer",
    "EarlyStopper",
    "EpochAdjustment",
    "LRReduction",
    "NonFiniteGuard",
    "PhaseDetector",
    "PlateauDetector",
    "StateValueError",
    "adjust_epochs",
    "budget_line",
    "chinchilla_tokens",
    "phase_window",
]
