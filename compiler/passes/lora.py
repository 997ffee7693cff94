"""Pass `inject_lora` (work in progress: signature is final, body lands next)."""

from __future__ import annotations

from typing import Any

from surogate.compiler.ir import Graph


def inject_lora(graph: Graph, cfg: Any) -> Graph:
    """Not implemented yet: raises so nobody mistakes it for done."""
    raise NotImplementedError("inject_lora is being written (C1)")
