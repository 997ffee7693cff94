"""Pass `schedule_ops`: the static execution order.

Program order (the order passes built the ops in) is the starting point. Dependencies are every
read-after-write, write-after-read and write-after-write on a tensor in program order, so any order
the pass produces computes the same values. Among ready ops it prefers forward, then backward, then
optimizer ops (copy and comm ops take the phase of the next compute op after them), and within a
phase the program order: a graph whose program order already has that shape is left unchanged.
"""

from __future__ import annotations

import heapq
from typing import Any

from surogate.compiler.ir import Graph, GraphError, view_owners
from surogate.compiler.passes.offload import rebuild_edges

PHASE_RANK = {"forward": 0, "backward": 1, "optimizer": 2}


def dependencies(graph: Graph) -> dict[str, set[str]]:
    """Op -> ops that must run before it (RAW, WAR and WAW hazards in program order)."""
    deps: dict[str, set[str]] = {n: set() for n in graph.order}
    last_write: dict[str, str] = {}
    reads_since: dict[str, list[str]] = {}
    owner = view_owners(graph.tensors)  # an access to a column view is an access to its parent's memory
    for n in graph.order:
        op = graph.op(n)
        ins = [owner.get(t, t) for t in op.inputs]
        outs = [owner.get(t, t) for t in op.outputs]
        for t in ins:
            w = last_write.get(t)
            if w is not None and w != n:
                deps[n].add(w)
        for t in outs:
            w = last_write.get(t)
            if w is not None and w != n:
                deps[n].add(w)
            deps[n].update(r for r in reads_since.get(t, ()) if r != n)
        for t in ins:
            reads_since.setdefault(t, []).append(n)
        for t in outs:
            last_write[t] = n
            reads_since[t] = []
    return deps


def _ranks(graph: Graph) -> dict[str, int]:
    """Phase rank per op; copy/comm ops inherit the rank of the next compute op (or the last one)."""
    ranks: dict[str, int] = {}
    pending: list[str] = []
    last = 0
    for n in graph.order:
        phase = graph.op(n).phase
        if phase in PHASE_RANK:
            last = PHASE_RANK[phase]
            for p in pending:
                ranks[p] = last
            pending = []
            ranks[n] = last
        else:
            pending.append(n)
    for p in pending:
        ranks[p] = last
    return ranks


def schedule_ops(graph: Graph, cfg: Any = None) -> Graph:
    """Order the ops topologically (Kahn's algorithm keyed by phase, then program position)."""
    deps = dependencies(graph)
    pos = {n: i for i, n in enumerate(graph.order)}
    ranks = _ranks(graph)
    users: dict[str, list[str]] = {n: [] for n in graph.order}
    missing = {n: len(d) for n, d in deps.items()}
    for n, d in deps.items():
        for p in d:
            users[p].append(n)
    ready = [(ranks[n], pos[n], n) for n, k in missing.items() if k == 0]
    heapq.heapify(ready)
    order: list[str] = []
    while ready:
        _, _, n = heapq.heappop(ready)
        order.append(n)
        for u in users[n]:
            missing[u] -= 1
            if missing[u] == 0:
                heapq.heappush(ready, (ranks[u], pos[u], u))
    if len(order) != len(graph.order):
        raise GraphError("op dependencies form a cycle; no schedule exists")
    graph.order = order
    rebuild_edges(graph)  # the memory passes leave edges stale (see OpInserter.commit)
    graph.check()
    graph.meta["optimizer_start"] = optimizer_start(graph)
    return graph


def optimizer_start(graph: Graph) -> int:
    """Index of the first op of the optimizer-step program (runs once per step, after the last micro-step).

    The optimizer ops, plus the copies and collectives right before them that exist only for them:
    host -> device loads whose staging only optimizer ops read, and `all_reduce`s marked
    `when: last_micro_step`. Everything before runs every micro-step. `len(order)` if there is none.
    """
    order = graph.order
    first = next((i for i, n in enumerate(order) if graph.op(n).phase == "optimizer"), len(order))
    later = set(order[first:])
    i = first
    while i > 0:
        op = graph.op(order[i - 1])
        if op.kind == "all_reduce" and op.attrs.get("when") == "last_micro_step":
            pass
        elif op.kind == "copy_h2d" and all(c in later for o in op.outputs for c in graph.consumers(o)):
            pass
        else:
            break
        i -= 1
        later.add(order[i])
    return i
