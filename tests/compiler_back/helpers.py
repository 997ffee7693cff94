"""Shared helpers for the back-half tests: run the back half on a synthetic graph, sum bytes."""

from __future__ import annotations

from typing import Any

from surogate.compiler.ir import Role, Space
from surogate.compiler.passes.liveness import is_persistent
from surogate.compiler.pipeline import run_passes
from surogate.compiler.plan import Plan, make_plan

from . import synth


def back_half(graph_kw: dict[str, Any] | None = None, **cfg_kw: Any) -> Plan:
    cfg = synth.cfg(**cfg_kw)
    graph = synth.build(**(graph_kw or {}))
    return make_plan(run_passes(graph, cfg, start_after="chunking"), cfg)


def persistent_bytes(plan: Plan, role: Role, space: Space = Space.DEVICE) -> int:
    """Raw (unaligned) bytes of whole-step tensors of a role in a space."""
    return sum(
        t.nbytes
        for n, t in plan.tensors.items()
        if t.role is role and t.space is space and plan.lifetimes[n] is not None and is_persistent(t)
    )


def check_staging(plan: Plan) -> int:
    """Assert every staged copy holds the current value of its host tensor; return how many were checked.

    For each staging tensor: the h2d copy that fills it comes after the last write of its source and
    before its first reader, and nothing writes the source in between.
    """
    pos_writes: dict[str, list[int]] = {}
    for i, op in enumerate(plan.ops):
        for t in op.outputs:
            pos_writes.setdefault(t, []).append(i)
    checked = 0
    for name, t in plan.tensors.items():
        src = t.attrs.get("staging_of")
        if src is None or plan.lifetimes[name] is None:
            continue
        fill = [i for i in pos_writes.get(name, []) if plan.ops[i].kind == "copy_h2d"]
        if not fill:
            continue  # a write-only staging buffer (the op writes it, a d2h stores it)
        c = fill[0]
        readers = [i for i, op in enumerate(plan.ops) if name in op.inputs and op.kind != "copy_d2h"]
        assert readers and c < min(readers), name
        assert not [w for w in pos_writes.get(src, []) if c < w < min(readers)], (name, src)
        checked += 1
    return checked
