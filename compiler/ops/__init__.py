"""The op vocabulary: every op kind declared once (name, attributes, shape rule, VJP rule).

Forward ops carry a shape rule (output shapes from input shapes + attributes) and a VJP rule (how
autodiff emits their backward ops). Backward op kinds are declared here too (no VJP) so that every
kind the compiler can emit is listed in one table, which the runtimes' kernel tables are checked
against. Tensors are kept flat ([B, T, heads*head_dim]); ops that need heads take them as attributes,
so the graph never needs view/reshape ops.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Shape = tuple[int, ...]
ShapeRule = Callable[[list[Shape], dict[str, Any]], list[Shape]]


@dataclass(frozen=True)
class OpDef:
    """One op kind. `vjp(ctx)` emits backward ops through an autodiff `VJPContext` (None: not differentiable).

    `differentiable` lists the input positions a gradient may flow to. `cheap_recompute` ops (dequant)
    are re-emitted in the backward pass instead of keeping their outputs alive.
    """

    kind: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: tuple[str, ...] = ()
    shape: ShapeRule | None = None
    vjp: Callable[[Any], None] | None = None
    differentiable: tuple[int, ...] = ()
    cheap_recompute: bool = False
    doc: str = ""


OPS: dict[str, OpDef] = {}


def register(op: OpDef) -> OpDef:
    if op.kind in OPS:
        raise ValueError(f"op kind {op.kind!r} declared twice")
    OPS[op.kind] = op
    return op


def opdef(kind: str) -> OpDef:
    try:
        return OPS[kind]
    except KeyError:
        raise KeyError(f"unknown op kind {kind!r}") from None


def infer_shapes(kind: str, in_shapes: list[Shape], attrs: dict[str, Any]) -> list[Shape]:
    """Output shapes of a forward op (raises ValueError on inconsistent inputs)."""
    rule = opdef(kind).shape
    if rule is None:
        raise ValueError(f"op kind {kind!r} has no shape rule")
    return rule(in_shapes, attrs)


from surogate.compiler.ops import defs as _defs  # noqa: E402,F401  - registers the vocabulary

__all__ = ["OPS", "OpDef", "Shape", "infer_shapes", "opdef", "register"]
