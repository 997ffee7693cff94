"""Pass `compute_liveness`: first and last schedule position at which each tensor must hold memory.

Persistent tensors (weights, master weights, quantized weights and scales, gradients, optimizer
states, and anything marked `attrs["persistent"]`) live for the whole step, since the step repeats.
Gradients and weights marked `attrs["transient"]` (ZeRO full-size buffers, staging copies) are
ordinary intervals. Every other tensor lives from its first to its last access; a tensor that is
read before any write in the schedule is live from position 0 (a batch input) or, if the step also
writes it, for the whole step (its value carries over to the next step). Tensors no op touches
get no interval and no memory. A column view (`attrs["view"]`, pass `group_lora_projections`) has no memory of
its own: its accesses count as its parent's, and it gets the parent's interval. Results go to
`graph.meta["liveness"]`: name -> (first, last) or None.
"""

from __future__ import annotations

from typing import Any

from surogate.compiler.ir import Graph, Role, Tensor, view_owners

PERSISTENT_ROLES = frozenset(
    {
        Role.FROZEN_WEIGHT,
        Role.TRAINABLE_WEIGHT,
        Role.MASTER_WEIGHT,
        Role.QUANT_WEIGHT,
        Role.QUANT_SCALE,
        Role.GRADIENT,
        Role.OPTIMIZER_STATE,
    }
)


def is_persistent(t: Tensor) -> bool:
    """Whether the tensor must keep its memory across the whole step (and between steps)."""
    if t.attrs.get("persistent"):
        return True
    return t.role in PERSISTENT_ROLES and not t.attrs.get("transient")


def compute_liveness(graph: Graph, cfg: Any = None) -> Graph:
    """Record (first, last) schedule positions per tensor in `graph.meta["liveness"]`."""
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    written: set[str] = set()
    read_first: set[str] = set()
    owner = view_owners(graph.tensors)  # a view's accesses are its parent's
    for i, n in enumerate(graph.order):
        op = graph.op(n)
        for t in (owner.get(t, t) for t in op.inputs):
            if t not in written and t not in first:
                read_first.add(t)
            first.setdefault(t, i)
            last[t] = i
        for t in (owner.get(t, t) for t in op.outputs):
            first.setdefault(t, i)
            last[t] = i
            written.add(t)
    end = max(len(graph.order) - 1, 0)
    live: dict[str, tuple[int, int] | None] = {}
    for name, t in graph.tensors.items():
        if name not in first:
            live[name] = None
        elif is_persistent(t) or (name in read_first and name in written):
            # Read before written means the value crosses from one step to the next: whole step.
            live[name] = (0, end)
        elif name in read_first:
            live[name] = (0, last[name])
        else:
            live[name] = (first[name], last[name])
    for name, parent in owner.items():
        live[name] = live.get(parent)
    graph.meta["liveness"] = live
    return graph
