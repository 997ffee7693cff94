"""Fit suggestions without re-running the whole pipeline for each what-if.

`surogate plan` reports, for each option change that could lower device memory, the device peak the
config would have with it (`report.suggest_fixes`). A full re-plan costs about a second at 32B, and most
of it repeats stages whose graph and options did not change. So:

- `StageTrace` (the `before` hook of `pipeline.front_graph` / `back_plan`) records, during the base plan,
  the options each stage (the model build, then every pass) reads through the config, and keeps a copy
  of the graph before each pass of the front half and before the first pass of the back half, with the
  values of the options read up to there.
- `Replanner` resumes a what-if from the latest copy whose recorded options have the same values in the
  changed config: every stage before it read only those options, on the same graph, so (a pass being a
  deterministic function of its graph and the options it reads) it would build the same graph again.
  The peak is read where the buffers pass leaves it, without freezing a Plan. Results are memoised (the
  greedy combination starts from a single knob already planned), and a change that no stage reads
  keeps the base peak.

Every figure is exactly what a full re-plan with that change gives (tests/compiler_back/test_fit.py).
`paused_gc` keeps Python's cyclic collector from rescanning the planner's millions of short-lived
objects (reference counting frees them); it roughly halves planning time at 32B.
"""

from __future__ import annotations

import gc
import json
import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from surogate.compiler import pipeline
from surogate.compiler.ir import Graph
from surogate.compiler.pipeline import FRONT_END, PASS_NAMES, restore, run_passes, snapshot
from surogate.errors import ConfigError, UserError

BACK_START = PASS_NAMES[PASS_NAMES.index(FRONT_END) + 1]  # first pass of the back half
_EVERYTHING = "*"  # a stage read the whole config (a method such as to_dict): no copy after it is reused
_MISSING = object()


@contextmanager
def paused_gc() -> Iterator[None]:
    """Run the block with the cyclic garbage collector off (restored afterwards)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _value(cfg: Any, name: str) -> Any:
    return getattr(cfg, name, _MISSING)


class _Recording:
    """A config that adds the name of every option read through it to `seen`."""

    __slots__ = ("_cfg", "_seen")

    def __init__(self, cfg: Any, seen: set[str]) -> None:
        self._cfg, self._seen = cfg, seen

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in self.__slots__:  # protocol look-ups (copy, pickle), not options
            raise AttributeError(name)
        value = getattr(self._cfg, name)
        self._seen.add(_EVERYTHING if callable(value) else name)
        return value


@dataclass(frozen=True)
class Checkpoint:
    """The graph before `stage` (serialized), valid for any config with these option values."""

    stage: str
    needs: dict[str, Any]
    data: bytes

    def valid_for(self, cfg: Any, whole: dict[str, Any]) -> bool:
        if _EVERYTHING in self.needs:
            return self.needs[_EVERYTHING] == whole
        return all(_value(cfg, k) == v for k, v in self.needs.items())

    def graph(self) -> Graph:
        # Back-half copies use the compact snapshot (the back half needs no DAG edges); front-half passes
        # may walk the DAG, so their copies are whole pickled graphs.
        return restore(self.data) if self.stage == BACK_START else pickle.loads(self.data)


def _whole(cfg: Any) -> dict[str, Any]:
    to_dict = getattr(cfg, "to_dict", None)
    return to_dict() if callable(to_dict) else dict(vars(cfg))


class StageTrace:
    """The `before` hook for one run of the pipeline on `cfg`: records the options read, saves checkpoints
    before the stages in `save_before` (into `checkpoints`)."""

    def __init__(self, cfg: Any, *, seen: set[str] | None = None,
                 save_before: tuple[str, ...] = tuple(PASS_NAMES[: PASS_NAMES.index(BACK_START) + 1])) -> None:
        self.cfg = cfg
        self.seen: set[str] = set(seen or ())
        self.save_before = save_before
        self.checkpoints: list[Checkpoint] = []

    def needs(self) -> dict[str, Any]:
        """The values of every option read so far (the whole config once a stage read all of it)."""
        if _EVERYTHING in self.seen:
            return {_EVERYTHING: _whole(self.cfg)}
        return {k: _value(self.cfg, k) for k in self.seen}

    def __call__(self, stage: str, graph: Graph | None) -> Any:
        if graph is not None and stage in self.save_before:
            data = snapshot(graph) if stage == BACK_START else pickle.dumps(graph, protocol=pickle.HIGHEST_PROTOCOL)
            self.checkpoints.append(Checkpoint(stage, self.needs(), data))
        return _Recording(self.cfg, self.seen)


class Replanner:
    """changes -> the device peak bytes of the base config re-planned with them (None: invalid config).

    `trace` is the StageTrace of the base plan (run to the end), `peak_bytes` that plan's device total
    (`report.device_total`: arena + backend workspace).
    """

    def __init__(self, cfg: Any, trace: StageTrace, peak_bytes: int) -> None:
        self.base = _whole(cfg)
        self.checkpoints = list(trace.checkpoints)
        self.final = trace.needs()  # what the whole base run read
        self.peak_bytes = int(peak_bytes)
        self.memo: dict[str, int | None] = {}
        self.resumed_from: dict[str, str] = {}  # memo key -> stage the re-plan started at (for tests, logs)

    def __call__(self, changes: dict[str, Any]) -> int | None:
        key = json.dumps(changes, sort_keys=True, default=str)
        if key not in self.memo:
            self.memo[key] = self._peak(changes, key)
        return self.memo[key]

    def _peak(self, changes: dict[str, Any], key: str) -> int | None:
        from surogate.schema import config_from_dict

        try:
            cfg = config_from_dict({**self.base, **changes})
        except (ConfigError, UserError, TypeError):
            return None
        whole = _whole(cfg)
        end = Checkpoint("end", self.final, b"")
        if end.valid_for(cfg, whole):  # no stage reads what changed
            self.resumed_from[key] = "end"
            return self.peak_bytes
        usable = [c for c in self.checkpoints if c.valid_for(cfg, whole)]
        start = max(usable, key=lambda c: PASS_NAMES.index(c.stage), default=None)
        back = PASS_NAMES.index(BACK_START)
        # A run that starts in the front half leaves a copy before the back half for later combinations
        # with the same front-half options.
        trace = StageTrace(cfg, seen=set(start.needs) if start else set(),
                           save_before=(BACK_START,) if start is None or PASS_NAMES.index(start.stage) < back else ())
        if start is None:
            self.resumed_from[key] = "build"
            graph = run_passes(pipeline.build_graph(trace("build", None)), cfg, before=trace)
        else:
            self.resumed_from[key] = start.stage
            i = PASS_NAMES.index(start.stage)
            graph = run_passes(start.graph(), cfg, start_after=PASS_NAMES[i - 1] if i else None, before=trace)
        self.checkpoints += trace.checkpoints
        # what `report.device_total` reads from a Plan: the arena (make_plan's `peak_bytes`) plus the
        # backend workspace the last pass recorded
        workspace = graph.meta.get("backend_workspace") or {}
        return int(graph.meta["buffers"]["device"]["arena_bytes"]) + int(workspace.get("bytes", 0))
