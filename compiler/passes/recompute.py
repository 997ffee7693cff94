"""Pass `apply_recompute` (work in progress: signature is final, body lands next)."""

from __future__ import annotations

from typing import Any

from surogate.compiler.ir import Graph


def apply_recompute(graph: Graph, cfg: Any) -> Graph:
    """Not implemented yet: raises so nobody mistakes it for done."""
    raise NotImplementedError("apply_recompute is being written (C1)")
