"""The `workspace` pass: device bytes the cuda backend holds beside the plan's arena.

The arena holds every planned tensor, but the backend's kernels also allocate through torch's caching
allocator: persistent scratch buffers (`CudaState.scratch`, one per distinct (tag, shape, dtype), kept for the
executor's lifetime), constants and per-step device scalars, and transient temporaries inside a kernel call
(dtype conversions of mixed-dtype GEMMs, flash attention's outputs and backward accumulators, NorMuon's
Newton-Schulz products) plus torch's cuBLAS workspace. This pass walks the schedule as the backend would and
sizes all of them with the functions the backend itself allocates through (`runtime/backends/cuda_sizes.py`).

After the first step every scratch buffer exists and stays; transients recur each step at their op. So the
device peak is arena + persistent + constants + scalars + cuBLAS workspace + the largest transient.
`graph.meta["backend_workspace"]` records the breakdown; `attach_to_memory` adds it to the plan's device
memory report (`backend_workspace`, `total_peak_bytes`).
"""

from __future__ import annotations

from typing import Any

from surogate.compiler.ir import Graph, first_writers
from surogate.compiler.passes.workspace_kinds import KindSizes
from surogate.runtime.backends import cuda_sizes as sz
from surogate.runtime.backends.cuda_sizes import Spec, Target

BLOCK = 512  # torch's caching allocator rounds every block up to a multiple of 512 bytes
STACKED_KINDS = frozenset({"linear_stacked", "linear_stacked_bwd_data", "linear_stacked_bwd_weight"})
GEMM_KINDS = frozenset({"linear", "linear_bwd_data", "linear_bwd_weight", "lm_head_ce", "lm_head_ce_bwd",
                        "lm_head_ce_fwd_bwd", "normuon_step", "qlinear", "qlinear_bwd_data", "qlinear_bwd_weight",
                        *STACKED_KINDS})
# Kinds whose kernels allocate nothing beside the arena; any other kind without a sizing method below runs the
# reference math on the device (MoE, FP4 matmuls, FP8 ones cuda_fp8 cannot take): its temporaries are not sized
# (reported as `not_sized`).
# (the stacked GEMMs are formed only over one dtype, as views of planned tensors: no conversion, no scratch)
NO_WORKSPACE = frozenset({"embedding", "identity", "copy_h2d", "copy_d2h", "all_reduce", "all_gather",
                          "reduce_scatter", "lora_fold_tail", *STACKED_KINDS})


def rounded(n: int) -> int:
    return -(-n // BLOCK) * BLOCK if n else 0


class _Walk(KindSizes):
    """State of one walk over the schedule: the distinct scratch specs, constants, scalars, transients."""

    def __init__(self, graph: Any, target: Target) -> None:
        self.g, self.target = graph, target
        self.tensors = graph.tensors
        self.ops = list(graph.ops() if callable(graph.ops) else graph.ops)
        self.first = first_writers(self.ops, self.tensors)
        self.upcast = sz.upcast_names(self.ops, self.tensors, lambda x, o: sz.promote(x, o) != x)
        self.scratch: dict[Spec, int] = {}
        self.constants: dict[tuple, int] = {}
        self.scalars = 0
        self.adamw_keys: set[tuple] = set()  # 8-bit AdamW hyperparameter buffers (one per distinct setting)
        self.step_scalar = 0
        self.transient: list[tuple[int, str, str]] = []  # (bytes, op name, kind)
        self.rms_seen: set[Any] = set()  # fwd_ops whose rmsnorm_bwd ran in this program (ctx._cuda_rms_dw)
        self.unsized: set[str] = set()

    def t(self, name: str) -> Any:
        return self.tensors[name]

    def add(self, *specs: Spec) -> None:
        for s in specs:
            self.scratch.setdefault(s, s.nbytes)

    def const(self, key: tuple, nbytes: int) -> None:
        self.constants.setdefault(key, nbytes)

    def run(self) -> None:
        optimizer_start = self.g.meta.get("optimizer_start")
        for i, op in enumerate(self.ops):
            if i == optimizer_start:
                self.rms_seen = set()  # a new program run: a new StepContext
            acc = sz.accumulates(op, i, self.first, self.tensors)
            fn = getattr(self, "k_" + op.kind, None)
            try:
                extra = fn(op, acc) if fn is not None else 0
            except (IndexError, KeyError):  # an op without the inputs / attrs its kernel reads (synthetic graphs)
                extra, fn = 0, None
            if fn is None and op.kind not in NO_WORKSPACE:
                self.unsized.add(op.kind)
            extra += self._unpacked(op)
            if extra:
                self.transient.append((int(extra), op.name, op.kind))

    def report(self) -> dict[str, Any]:
        by_tag: dict[str, int] = {}
        for spec, n in self.scratch.items():
            tag = spec.tag.split(":")[0]
            by_tag[tag] = by_tag.get(tag, 0) + n
        top = max(self.transient, default=(0, None, None))
        by_kind: dict[str, int] = {}
        for n, _, kind in self.transient:
            by_kind[kind] = max(by_kind.get(kind, 0), n)
        gemm = self.target.cuda and any(op.kind in GEMM_KINDS for op in self.ops)
        cublas = sz.cublas_workspace(self.target.capability) if gemm else 0
        persistent = sum(self.scratch.values())
        scalars = self.scalars + self.step_scalar
        allocated = (sum(rounded(n) for n in self.scratch.values()) + sum(rounded(n) for n in self.constants.values())
                     + rounded(self.scalars) + rounded(self.step_scalar) + rounded(top[0]) + cublas)
        return {
            "target": {"cuda": self.target.cuda, "sms": self.target.sms, "capability": list(self.target.capability)},
            "persistent_bytes": persistent,
            "persistent_buffers": len(self.scratch),
            "constants_bytes": sum(self.constants.values()),
            "scalars_bytes": scalars,
            "transient_bytes": top[0],
            "transient_at": {"op": top[1], "kind": top[2]},
            "cublas_workspace_bytes": cublas,
            "bytes": allocated,  # as torch's allocator counts them (blocks of 512 bytes)
            "by_tag": dict(sorted(by_tag.items(), key=lambda kv: -kv[1])),
            "transient_by_kind": dict(sorted(by_kind.items(), key=lambda kv: -kv[1])),
            "not_sized": sorted(self.unsized),
        }


def estimate_workspace(graph: Any, target: Target | None = None) -> dict[str, Any]:
    """The cuda backend's device bytes beside the arena for a compiled graph or Plan (ops in schedule order,
    tensors with shapes), on `target` (default: an H100): see the module docstring for what is counted."""
    walk = _Walk(graph, target or Target())
    walk.run()
    return walk.report()


def scratch_specs(graph: Any, target: Target) -> dict[Spec, int]:
    """The distinct persistent scratch buffers (spec -> bytes) the backend allocates running `graph`."""
    walk = _Walk(graph, target)
    walk.run()
    return dict(walk.scratch)


def estimate_backend_workspace(graph: Graph, cfg: Any) -> Graph:
    """Pass: record the cuda backend's workspace beside the arena (`graph.meta["backend_workspace"]`)."""
    graph.meta["backend_workspace"] = estimate_workspace(graph)
    return graph


def attach_to_memory(plan: Any) -> None:
    """Add the recorded backend workspace to the plan's device memory report: `backend_workspace` (the
    breakdown) and `total_peak_bytes` (arena + workspace: what the GPU must hold). Existing keys keep their
    meaning (`peak_bytes` is the arena)."""
    ws = plan.meta.get("backend_workspace")
    dev = plan.memory.get("device")
    if ws is None or dev is None:
        return
    dev["backend_workspace"] = ws
    dev["total_peak_bytes"] = int(dev["peak_bytes"]) + int(ws["bytes"])
