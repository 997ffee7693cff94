"""Pass `emit_backward` (work in progress: signature is final, body lands next)."""

from __future__ import annotations

from typing import Any

from surogate.compiler.ir import Graph


def emit_backward(graph: Graph, cfg: Any) -> Graph:
    """Not implemented yet: raises so nobody mistakes it for done."""
    raise NotImplementedError("emit_backward is being written (C1)")
