"""Pass `apply_chunking` (work in progress: signature is final, body lands next)."""

from __future__ import annotations

from typing import Any

from surogate.compiler.ir import Graph


def apply_chunking(graph: Graph, cfg: Any) -> Graph:
    """Not implemented yet: raises so nobody mistakes it for done."""
    raise NotImplementedError("apply_chunking is being written (C1)")
