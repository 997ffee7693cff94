"""Shared helpers for the back-half tests: run the back half on a synthetic graph, sum bytes."""

from __future__ import annotations

from typing import Any

import synth

from surogate.compiler.ir import Role, Space
from surogate.compiler.passes.liveness import is_persistent
from surogate.compiler.pipeline import run_passes
from surogate.compiler.plan import Plan, make_plan


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
