"""Pass `apply_recompute` (body lands next; `recompute: false` path is final)."""

from __future__ import annotations

from typing import Any

from surogate.compiler.ir import Graph


def apply_recompute(graph: Graph, cfg: Any) -> Graph:
    if not getattr(cfg, "recompute", True):
        return graph
    raise NotImplementedError("apply_recompute is being written (C1)")
