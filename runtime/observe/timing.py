"""`debug_time_breakdown`: wall time per training phase, reported every N steps."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

PHASES = ("data", "forward", "backward", "optimizer", "communication", "checkpoint")


class PhaseTimer:
    """Accumulates seconds per phase between reports.

    Use `with timer.phase("forward"):` around host-side work, or `timer.add("forward", seconds)` with
    figures measured by CUDA events (GPU work is asynchronous: time it with events, or pass `sync`, e.g.
    `torch.cuda.synchronize`, which the context manager calls before reading the clock).
    When disabled every call is a no-op costing one attribute check.
    """

    def __init__(self, enabled: bool = True, sync: Callable[[], None] | None = None):
        self.enabled = enabled
        self.sync = sync
        self.totals: dict[str, float] = {}
        self.steps = 0
        self.wall = 0.0  # summed step wall time, when the caller reports it

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        if self.sync:
            self.sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.sync:
                self.sync()
            self.add(name, time.perf_counter() - t0)

    def add(self, name: str, seconds: float) -> None:
        if self.enabled:
            self.totals[name] = self.totals.get(name, 0.0) + seconds

    def step_done(self, wall_seconds: float | None = None) -> None:
        """One optimizer step finished; `wall_seconds` (its wall time) lets the report show the time no
        phase accounted for as `other`."""
        self.steps += 1
        if wall_seconds is not None:
            self.wall += wall_seconds

    def report(self) -> dict:
        """Per-phase mean ms per step and share of the step time since the last report; then reset.

        The step time is the reported wall time when known (unmeasured time becomes `other`), else
        the sum of the measured phases.
        """
        totals = dict(self.totals)
        measured = sum(totals.values())
        if self.wall > measured:
            totals["other"] = self.wall - measured
        whole = max(self.wall, measured)
        steps = max(self.steps, 1)
        names = [p for p in PHASES if p in totals] + sorted(set(totals) - {*PHASES, "other"})
        names += ["other"] if "other" in totals else []
        out = {
            "steps": self.steps,
            "phases": {
                n: {"ms_per_step": 1000.0 * totals[n] / steps, "share": totals[n] / whole if whole else 0.0}
                for n in names
            },
        }
        self.totals, self.steps, self.wall = {}, 0, 0.0
        return out


def format_breakdown(report: dict) -> str:
    parts = [f"{n} {v['ms_per_step']:.1f}ms ({v['share'] * 100:.0f}%)" for n, v in report["phases"].items()]
    return f"time breakdown over {report['steps']} steps: " + (", ".join(parts) or "nothing measured")
