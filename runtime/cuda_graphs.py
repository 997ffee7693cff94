"""CUDA-graph capture and replay of the executor's programs (the micro-step and the optimizer step).

Every tensor of a plan lives at a fixed arena offset, inputs are written into the same views each step
(`cu_seqlens` is a fixed-size buffer), and per-step scalars (learning rate, bias correction) are device
tensors of the cuda kernel table refreshed before each replay: so a program captured once replays with
new data. A program runs eagerly `warmup` times first (Numba compiles on first launch, scratch buffers and
cuBLAS workspaces are created), is captured on its next run and replayed from then on.

    graphs = install(executor, enabled=cfg.use_cuda_graphs)   # executor.run now replays captured graphs
    ...
    rec = AllocationRecorder(); rec.record(); <step>; rec.record(); rec.deltas()  # "no allocation" check

`use_cuda_graphs: false` or a CPU executor run eagerly; `reason` says why. Dropout masks depend on the step
number: the kernels read it from a device tensor refreshed before each replay (`CudaState.step_index`).

Document boundaries: `install` watches the executor's writes of `cu_seqlens` (host tensors, read without a
device sync) and sets how many entries flash attention reads (`cuda_attention.doc_slots`, a power-of-two
bucket); the micro-step is captured once per bucket and each replay restores the loss tensor that its own
capture recorded (`executor.observed`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from surogate.runtime.executor import MICRO_STEP, OPTIMIZER_STEP, ArenaExecutor

CAPTURED_PROGRAMS = (MICRO_STEP, OPTIMIZER_STEP)


def eager_reason(executor: ArenaExecutor, enabled: bool) -> str | None:
    """Why this executor's programs must run eagerly, or None when they can be captured."""
    if not enabled:
        return "use_cuda_graphs is false"
    if getattr(executor.kernels, "state", None) is None:
        return "the kernel table is not the cuda backend's"
    if int(executor.plan.meta.get("zero", {}).get("world", 1)) > 1:
        # a captured micro-step would freeze whether the last-micro-step gradient all-reduce runs
        return "multi-rank runs keep collectives outside CUDA graphs"
    from surogate.runtime.backends.cuda import reference_kinds

    # the reference math may read host values (the step, data-dependent shapes) that a replay would freeze
    slow = reference_kinds([op for p in CAPTURED_PROGRAMS for op in executor.programs.get(p, ())],
                           executor.plan.tensors, executor.device)
    if slow:
        return f"op kinds {', '.join(slow)} run through the reference math, which CUDA graphs cannot capture"
    if executor.device.type != "cuda" or not torch.cuda.is_available():
        return "the executor is not on a CUDA device"
    return None


class GraphRunner:
    """Runs `executor`'s programs, capturing MICRO_STEP and OPTIMIZER_STEP after `warmup` eager runs."""

    def __init__(self, executor: ArenaExecutor, enabled: bool = True, warmup: int = 1) -> None:
        self.executor = executor
        self.eager_run: Callable = executor.run  # the executor's own (eager) run, bound before install()
        self.reason = eager_reason(executor, enabled)
        self.warmup = max(1, int(warmup))
        self.graphs: dict[tuple, Any] = {}  # (program, cu_seqlens slots) -> captured graph
        self.observed: dict[tuple, dict] = {}  # per graph: the executor's watched tensors its capture recorded
        self.runs: dict[str, int] = {}
        self.pool = None
        self.stream = None  # the side stream warm-ups and captures run on (torch's recipe: warm up where you capture)
        self.replays = 0
        self._norm_out: dict[tuple, torch.Tensor] = {}  # gradient-norm graphs' output scalars

    @property
    def enabled(self) -> bool:
        return self.reason is None

    def run(self, program: str, ctx: Any) -> None:
        if not self.enabled or program not in CAPTURED_PROGRAMS:
            self.eager_run(program, ctx)
            return
        n = self.runs.get(program, 0)
        self.runs[program] = n + 1
        state = self.executor.kernels.state
        key = (program, state.cu_slots if program == MICRO_STEP else None)
        if key not in self.graphs and n < self.warmup:
            # compiles kernels, creates scratch buffers and library workspaces
            self._warm_up(lambda: self.eager_run(program, ctx))
            return
        if key not in self.graphs:  # a new document-slot bucket after warm-up: captured directly
            before = dict(self.executor.observed)
            if program == OPTIMIZER_STEP:
                # per-step scalars belong to optimizer kernels and exist after the optimizer's warm-up run: packed
                # into one buffer (before any graph holds their addresses), a refresh is one copy
                self.executor.kernels.state.consolidate_scalars()
            # recorded, not executed: replayed right below
            self.graphs[key], _ = self._capture(lambda: self.eager_run(program, ctx))
            self.observed[key] = {k: v for k, v in self.executor.observed.items() if before.get(k) is not v}
        state.refresh_scalars(ctx)  # learning rate / bias correction of this step, before the replay
        self.graphs[key].replay()
        self.executor.observed.update(self.observed[key])  # this graph's loss tensor, not the last capture's
        self.replays += 1

    def sum_of_squares(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """Sum of the squared L2 norms of `tensors` (fp32 per tensor, fp64 total) as a device scalar. Captured
        like a program (eager warm-up, then one capture, replays after): the training loop's gradient norm
        then allocates nothing either. Eager where graphs are off."""
        if not self.enabled:
            return fused_sum_of_squares(tensors)
        key = ("gradient_norm", hash(tuple(t.data_ptr() for t in tensors)))  # arena views: fixed addresses
        if key in self.graphs:
            self.graphs[key].replay()
            self.replays += 1
            return self._norm_out[key]
        n = self.runs.get("gradient_norm", 0)
        self.runs["gradient_norm"] = n + 1
        if n < self.warmup:
            return self._warm_up(lambda: fused_sum_of_squares(tensors))
        # the output lives in the graph's pool, rewritten by each replay
        self.graphs[key], self._norm_out[key] = self._capture(lambda: fused_sum_of_squares(tensors))
        self.graphs[key].replay()
        self.replays += 1
        return self._norm_out[key]

    def _side_stream(self) -> Any:
        if self.stream is None:
            self.stream = torch.cuda.Stream()
        return self.stream

    def _warm_up(self, work: Callable[[], Any]) -> Any:
        """`work()` eagerly on the capture stream (its cuBLAS workspace, the Numba stream wrapper exist before the
        capture), ordered after the inputs just written and before whatever reads the results."""
        side, main = self._side_stream(), torch.cuda.current_stream()
        side.wait_stream(main)
        with torch.cuda.stream(side):
            out = work()
        main.wait_stream(side)
        return out

    def _capture(self, work: Callable[[], Any]) -> tuple[Any, Any]:
        """(the CUDA graph of `work()`, what the capture returned) on the capture stream and the shared pool."""
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self.pool, stream=self._side_stream()):
            out = work()
        torch.cuda.synchronize()
        return graph, out


def fused_sum_of_squares(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Fused per-tensor norms (one kernel group), their squares summed in fp64."""
    if not tensors:
        return torch.zeros((), dtype=torch.float64)
    return torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float32)).double().pow(2).sum()


def install(executor: ArenaExecutor, enabled: bool = True, warmup: int = 1) -> GraphRunner:
    """Route `executor.run` through a GraphRunner (eager where `GraphRunner.reason` says so); on the cuda
    backend also size flash attention's document slots from each written `cu_seqlens` (graphs or not)."""
    runner = GraphRunner(executor, enabled, warmup)
    executor.run = runner.run  # type: ignore[method-assign]
    executor.graphs = runner  # the training loop's gradient norm goes through it too (sum_of_squares)
    state = getattr(executor.kernels, "state", None)
    if state is not None and "cu_seqlens" in executor.views:
        watch_doc_slots(executor, state)
    return runner


def watch_doc_slots(executor: ArenaExecutor, state: Any) -> None:
    """Wrap `executor.write`: a written `cu_seqlens` sets `state.cu_slots` (flash attention's entries)."""
    from surogate.runtime.backends.cuda_attention import doc_slots

    write = executor.write

    def write_and_watch(name: str, value: torch.Tensor) -> None:
        write(name, value)
        if name == "cu_seqlens":
            # a host tensor is read for free; a device one costs a sync (outside any capture: inputs are
            # written between programs)
            state.cu_slots = doc_slots(value if value.device.type == "cpu" else value.cpu())

    executor.write = write_and_watch  # type: ignore[method-assign]


class AllocationRecorder:
    """Snapshots of the CUDA caching allocator's counters, to show nothing is allocated after step 1."""

    KEYS = ("allocation.all.allocated", "segment.all.allocated", "reserved_bytes.all.current",
            "allocated_bytes.all.current")

    def __init__(self) -> None:
        self.snapshots: list[dict[str, int]] = []

    def record(self) -> dict[str, int]:
        torch.cuda.synchronize()
        stats = torch.cuda.memory_stats()
        snap = {k: int(stats.get(k, 0)) for k in self.KEYS}
        self.snapshots.append(snap)
        return snap

    def deltas(self) -> list[dict[str, int]]:
        """Counter changes between consecutive snapshots."""
        return [{k: b[k] - a[k] for k in self.KEYS} for a, b in zip(self.snapshots, self.snapshots[1:], strict=False)]

    def allocations_after_first(self) -> int:
        """Allocator calls between the second snapshot and the last (0 when steady state allocates nothing)."""
        if len(self.snapshots) < 2:
            raise ValueError("record at least twice (after step 1 and after a later step)")
        first, last = self.snapshots[1], self.snapshots[-1]
        return last["allocation.all.allocated"] - first["allocation.all.allocated"]
