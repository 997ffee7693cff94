"""Observability and training automation: console, JSONL log, trackers, plots, diagnostics.

The training loop uses `TrainingObserver` (see `observer.py` for the calls it must make) and the pure
`adjust_epochs` before computing its schedule.
"""

from surogate.runtime.observe.diagnostics import adjust_epochs, budget_line, chinchilla_tokens
from surogate.runtime.observe.events import Decisions, EndSummary, EvalMetrics, Phase, RunInfo, StepMetrics
from surogate.runtime.observe.jsonl import read_log
from surogate.runtime.observe.naming import resolve_run_name
from surogate.runtime.observe.observer import TrainingObserver
from surogate.runtime.observe.timing import PhaseTimer

__all__ = [
    "Decisions",
    "EndSummary",
    "EvalMetrics",
    "Phase",
    "PhaseTimer",
    "RunInfo",
    "StepMetrics",
    "TrainingObserver",
    "adjust_epochs",
    "budget_line",
    "chinchilla_tokens",
    "read_log",
    "resolve_run_name",
]
