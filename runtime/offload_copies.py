"""Offload copies (`copy_h2d` / `copy_d2h`) on a side stream, overlapping compute.

The planner places each host -> device load one group early (`compiler/passes/offload.py: _place_loads`) so
that the transfer can run while the current group computes, and stores each offloaded activation or gradient
right after its writer; this module is the runtime half. On a CUDA device the copies run on one copy stream
beside the compute stream (the DMA engines move the bytes while the SMs compute); on the CPU they run inline.

Ordering, with one copy stream (in order) beside the compute stream:

* a copy starts after everything issued before it on the compute stream (`wait_stream`): its source has been
  written, and the memory it overwrites is no longer read by earlier ops;
* a compute op waits for a pending copy when it reads or writes the copy's destination memory, or writes the
  copy's source memory (arena memory is reused: the source of a device -> host store may be the next layer's
  buffer). Memory is compared by planned byte ranges, so a tensor sharing a copy's memory under another name
  is caught too. Waiting for one copy retires the copies issued before it (one stream, in order);
* a program ends with the compute stream joined to the copy stream (a CUDA-graph capture must end joined),
  and the host reads or writes host arena memory only after `ArenaExecutor.synchronize`.

A gradient store that accumulates (`copy_d2h` with `accumulate`, gradient accumulation over micro-steps) adds
into the host copy through a device alias of the host memory (a kernel reading and writing it over the bus).

`DeferredStreams` emulates the asynchrony on the CPU for tests: a copy runs only when the executor waits for it
(or at the end of the program), as late as the ordering rules allow, so a missing wait reads or writes stale
memory and a test comparing with inline copies fails.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from surogate.compiler.ir import Op, view_root
from surogate.compiler.plan import Plan

COPY_KINDS = frozenset({"copy_h2d", "copy_d2h"})

Range = tuple[str, int, int]  # (arena space, first byte, end byte)


class CopyStreams(Protocol):
    """Where copies run: `issue` returns a token that `wait` blocks compute on (None: already done)."""

    def begin(self) -> None: ...

    def issue(self, copy: Callable[[], None]) -> Any: ...

    def wait(self, token: Any) -> None: ...

    def join(self) -> None: ...


class InlineStreams:
    """Copies run when issued (the CPU, where both arenas are host memory)."""

    def begin(self) -> None:
        pass

    def issue(self, copy: Callable[[], None]) -> Any:
        copy()
        return None

    def wait(self, token: Any) -> None:
        pass

    def join(self) -> None:
        pass


class DeferredStreams:
    """Copies queued and run as late as possible: when compute waits for them, or at the program's end."""

    def __init__(self) -> None:
        self.queue: list[tuple[int, Callable[[], None]]] = []
        self.issued = 0
        self.deferred_runs = 0  # copies that ran later than issued (a test checks the emulation defers)

    def begin(self) -> None:
        pass

    def issue(self, copy: Callable[[], None]) -> Any:
        self.issued += 1
        self.queue.append((self.issued, copy))
        return self.issued

    def wait(self, token: Any) -> None:
        while self.queue and self.queue[0][0] <= token:  # one stream: earlier copies finish first
            self.queue.pop(0)[1]()
            self.deferred_runs += 1

    def join(self) -> None:
        if self.queue:
            self.wait(self.queue[-1][0])


class CudaStreams:
    """One copy stream beside torch's current (compute) stream, ordered with events."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device=device)
        self.compute: Any = None
        self._events: list[Any] = []
        self._next = 0

    def begin(self) -> None:
        # the current stream at each run: eager runs use the default stream, a CUDA-graph capture its own
        self.compute = torch.cuda.current_stream(self.device)
        self._next = 0

    def _event(self) -> Any:
        # reused per program position: a replayed graph re-records them, eager runs re-record them in order
        if self._next == len(self._events):
            self._events.append(torch.cuda.Event())
        event = self._events[self._next]
        self._next += 1
        return event

    def issue(self, copy: Callable[[], None]) -> Any:
        self.stream.wait_stream(self.compute)
        with torch.cuda.stream(self.stream):
            copy()
        event = self._event()
        event.record(self.stream)
        return event

    def wait(self, token: Any) -> None:
        self.compute.wait_event(token)

    def join(self) -> None:
        self.compute.wait_stream(self.stream)


@dataclass
class _Pending:
    token: Any
    source: Range
    destination: Range


def _overlaps(a: Range, b: Range) -> bool:
    return a[0] == b[0] and a[1] < b[2] and b[1] < a[2]


class OffloadCopies:
    """Issues a plan's copy ops on `streams` and makes compute ops wait for the copies they depend on."""

    def __init__(self, plan: Plan, streams: CopyStreams | None = None) -> None:
        self.streams: CopyStreams = streams or InlineStreams()
        self.pending: list[_Pending] = []
        self._ranges: dict[str, Range | None] = {}
        self._plan = plan

    def range_of(self, name: str) -> Range | None:
        """The planned bytes holding tensor `name` (a column view: its owner's, conservatively)."""
        if name not in self._ranges:
            tensors = self._plan.tensors
            t = tensors[view_root(tensors, name)]
            self._ranges[name] = None if t.offset is None else (t.space.value, t.offset, t.offset + t.nbytes)
        return self._ranges[name]

    def begin(self) -> None:
        self.pending.clear()
        self.streams.begin()

    def issue(self, op: Op, copy: Callable[[], None]) -> None:
        """Run copy op `op` (its `copy` does the work) on the copy stream."""
        token = self.streams.issue(copy)
        if token is None:
            return
        src, dst = self.range_of(op.inputs[0]), self.range_of(op.outputs[0])
        if src is not None and dst is not None:
            self.pending.append(_Pending(token, src, dst))
        else:  # unplanned memory (never the case for planned copies): no overlap with anything after
            self.streams.wait(token)

    def before(self, op: Op) -> None:
        """Wait for the pending copies compute op `op` depends on (see the module doc)."""
        if not self.pending:
            return
        reads = [r for n in op.inputs if (r := self.range_of(n)) is not None]
        writes = [r for n in op.outputs if (r := self.range_of(n)) is not None]
        last = -1
        for i, p in enumerate(self.pending):
            if any(_overlaps(p.destination, r) for r in (*reads, *writes)) or \
                    any(_overlaps(p.source, w) for w in writes):
                last = i
        if last >= 0:
            self.streams.wait(self.pending[last].token)
            del self.pending[: last + 1]

    def join(self) -> None:
        """End of a program: compute waits for every copy still in flight."""
        self.streams.join()
        self.pending.clear()


def default_streams(device: torch.device) -> CopyStreams:
    """A copy stream on a CUDA device, inline copies elsewhere."""
    if device.type == "cuda" and torch.cuda.is_available():
        return CudaStreams(device)
    return InlineStreams()
