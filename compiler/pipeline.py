"""The pass pipeline: config -> model graph -> passes -> Plan.

`PASSES` is the ordered list of (name, function); every pass is `(graph, cfg) -> graph`. The front
half (lora ... chunking) is imported lazily, so this module imports even while those are in work.
`--dump-after PASS` prints the graph after that pass (`format_graph`).
"""

from __future__ import annotations

import importlib
import pickle
import sys
from collections.abc import Callable
from typing import Any, TextIO

from surogate.compiler.ir import Graph
from surogate.compiler.passes.buffers import assign_buffers
from surogate.compiler.passes.liveness import compute_liveness
from surogate.compiler.passes.offload import apply_offload, rebuild_edges
from surogate.compiler.passes.optimizer import build_optimizer
from surogate.compiler.passes.schedule import schedule_ops
from surogate.compiler.passes.zero import apply_zero
from surogate.compiler.plan import Plan, make_plan
from surogate.errors import UserError

Pass = Callable[[Graph, Any], Graph]
# Called before each stage ("build", then every pass) with the stage's name and the graph it will get
# (None before "build"); returns the config that stage reads. Fit suggestions use it to record which
# options each pass reads and to keep copies of the graph between passes (compiler/fit.py).
StageHook = Callable[[str, "Graph | None"], Any]


def _lazy(module: str, func: str) -> Pass:
    def run(graph: Graph, cfg: Any) -> Graph:
        return getattr(importlib.import_module(module), func)(graph, cfg)

    run.__name__ = func
    run.__doc__ = f"{module}.{func}"
    return run


PASSES: list[tuple[str, Pass]] = [
    ("lora", _lazy("surogate.compiler.passes.lora", "inject_lora")),
    ("precision", _lazy("surogate.compiler.passes.precision", "annotate_precision")),
    ("autodiff", _lazy("surogate.compiler.passes.autodiff", "emit_backward")),
    ("recompute", _lazy("surogate.compiler.passes.recompute", "apply_recompute")),
    ("fuse_lora_merge", _lazy("surogate.compiler.passes.fusion", "fuse_lora_merge")),
    ("fuse_add_rmsnorm", _lazy("surogate.compiler.passes.fusion", "fuse_add_rmsnorm")),
    ("fuse_rmsnorm_rope", _lazy("surogate.compiler.passes.fusion", "fuse_rmsnorm_rope")),
    ("fuse_lm_head_ce", _lazy("surogate.compiler.passes.fusion_loss", "fuse_lm_head_ce")),
    ("chunking", _lazy("surogate.compiler.passes.chunking", "apply_chunking")),
    ("offload", apply_offload),
    ("zero", apply_zero),
    ("optimizer", build_optimizer),
    ("group_lora", _lazy("surogate.compiler.passes.lora_group", "group_lora_projections")),
    ("fold_lora", _lazy("surogate.compiler.passes.lora_fold", "fold_lora_up_projection")),
    ("schedule", schedule_ops),
    ("liveness", compute_liveness),
    ("buffers", assign_buffers),
    ("workspace", _lazy("surogate.compiler.passes.workspace", "estimate_backend_workspace")),
]
PASS_NAMES = [name for name, _ in PASSES]


def run_passes(
    graph: Graph,
    cfg: Any,
    *,
    start_after: str | None = None,
    dump_after: str | None = None,
    out: TextIO | None = None,
    before: StageHook | None = None,
) -> Graph:
    """Run the pipeline on `graph` (from the pass after `start_after`, or from the first)."""
    check_pass_name(dump_after, "--dump-after")
    check_pass_name(start_after, "start_after")
    start = PASS_NAMES.index(start_after) + 1 if start_after else 0
    for name, fn in PASSES[start:]:
        graph = fn(graph, cfg if before is None else before(name, graph))
        if name == dump_after:
            (out or sys.stdout).write(format_graph(graph, title=f"graph after pass '{name}'"))
    return graph


def check_pass_name(name: str | None, what: str) -> None:
    if name is not None and name not in PASS_NAMES:
        raise UserError(f"{what}: unknown pass {name!r}; passes are: {', '.join(PASS_NAMES)}")


def build_graph(cfg: Any) -> Graph:
    """The model's forward graph for `cfg` (C1's model resolution and builders)."""
    from surogate.compiler.models import build_forward_graph, resolve_model

    spec = resolve_model(cfg)
    graph = build_forward_graph(spec, cfg)
    graph.meta.setdefault("model", str(getattr(cfg, "model", "")))
    return graph


FRONT_END = "chunking"  # last pass of the front half (model-dependent rewrites)
# Options only the back half reads: re-planning with one of them changed can start from a saved front half.
BACK_HALF_OPTIONS = frozenset({
    "offload_residual", "offload_master", "offload_optimizer", "offload_grads", "offload_quants",
    "use_zero_copy", "use_write_combined", "zero_level", "shard_weights", "shard_gradients", "gpus",
    "optimizer", "max_grad_norm",
})


def front_graph(
    cfg: Any, *, dump_after: str | None = None, out: TextIO | None = None, before: StageHook | None = None
) -> Graph:
    """The model graph after the front half of the pipeline (through `chunking`)."""
    check_pass_name(dump_after, "--dump-after")
    graph = build_graph(cfg if before is None else before("build", None))
    for name, fn in PASSES[: PASS_NAMES.index(FRONT_END) + 1]:
        graph = fn(graph, cfg if before is None else before(name, graph))
        if name == dump_after:
            (out or sys.stdout).write(format_graph(graph, title=f"graph after pass '{name}'"))
    return graph


def back_plan(
    graph: Graph,
    cfg: Any,
    *,
    dump_after: str | None = None,
    out: TextIO | None = None,
    normalize: bool = True,
    before: StageHook | None = None,
) -> Plan:
    """Run the back half on a front-half graph (mutating it) and freeze the Plan (see `make_plan`)."""
    from surogate.compiler.passes.workspace import attach_to_memory

    graph = run_passes(graph, cfg, start_after=FRONT_END, dump_after=dump_after, out=out, before=before)
    plan = make_plan(graph, cfg, normalize=normalize)
    attach_to_memory(plan)  # the cuda backend's own buffers beside the arena (total_peak_bytes)
    return plan


def snapshot(graph: Graph) -> bytes:
    """A compact copy of a graph (tensors, ops in order, meta; no DAG edges) for `restore`."""
    return pickle.dumps((graph.tensors, list(graph.ops()), graph.meta), protocol=pickle.HIGHEST_PROTOCOL)


def restore(data: bytes) -> Graph:
    """The graph saved by `snapshot`, with its tensor -> op indices rebuilt.

    Its DAG has no edges: the back half only uses the indices, and the schedule pass rebuilds the edges.
    """
    tensors, ops, meta = pickle.loads(data)
    graph = Graph()
    graph.tensors, graph.meta = tensors, meta
    graph.dag.add_nodes_from((op.name, {"op": op}) for op in ops)
    graph.order = [op.name for op in ops]
    rebuild_edges(graph, edges=False)
    return graph


def compile_plan(cfg: Any, *, dump_after: str | None = None, out: TextIO | None = None) -> Plan:
    """Compile a config into a Plan (per rank)."""
    return back_plan(front_graph(cfg, dump_after=dump_after, out=out), cfg, dump_after=dump_after, out=out)


def _fmt_shape(shape: tuple[int, ...]) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


def format_graph(graph: Graph, title: str = "graph") -> str:
    """Readable text: ops in program order with their tensors, then the tensor table."""
    lines = [f"== {title}: {len(graph.order)} ops, {len(graph.tensors)} tensors =="]
    for i, op in enumerate(graph.ops()):
        layer = f"L{op.layer}" if op.layer is not None else "-"
        attrs = "" if not op.attrs else " " + ", ".join(f"{k}={v}" for k, v in op.attrs.items())
        lines.append(f"{i:5d} {op.phase:<9} {layer:>4} {op.name}: {op.kind}"
                     f"({', '.join(op.inputs)}) -> {', '.join(op.outputs)}{attrs}")
    lines.append("-- tensors --")
    for t in graph.tensors.values():
        where = t.space.value + (f"@{t.offset}" if t.offset is not None else "")
        lines.append(f"  {t.name}: {t.dtype}{_fmt_shape(t.shape)} {t.role.value} {where} {t.nbytes} B")
    return "\n".join(lines) + "\n"
