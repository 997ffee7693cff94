"""Pass `annotate_precision` (work in progress: signature is final, body lands next)."""

from __future__ import annotations

from typing import Any

from surogate.compiler.ir import Graph


def annotate_precision(graph: Graph, cfg: Any) -> Graph:
    """Not implemented yet: raises so nobody mistakes it for done."""
    raise NotImplementedError("annotate_precision is being written (C1)")
