"""Pass `apply_chunking` (body lands next)."""

from __future__ import annotations

from typing import Any

from surogate.compiler.ir import Graph


def apply_chunking(graph: Graph, cfg: Any) -> Graph:
    return graph
