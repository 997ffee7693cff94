"""Pass `annotate_precision` (minimal until the full recipe pass lands): records gradient dtypes."""

from __future__ import annotations

from typing import Any

from surogate.compiler.ir import Graph


def annotate_precision(graph: Graph, cfg: Any) -> Graph:
    graph.meta.setdefault("grad_dtype", None)
    return graph
