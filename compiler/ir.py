"""The compiler's intermediate representation: a tensor table plus a `networkx` graph of ops.

Every pass reads and rewrites a `Graph`. Shapes are static (batch and sequence come from the config),
so every tensor has a byte size known at compile time; buffer assignment later gives each tensor an
offset in one arena per memory space. Ops are nodes of `Graph.dag` (keyed by op name); an edge u -> v
means v reads a tensor that u writes (the edge's `tensor` attribute names it). `Graph.order` is the
schedule once the schedule pass has run: the op names in execution order.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

import networkx as nx

# Bytes per element. Sub-byte formats (nf4, fp4) are stored packed: their tensors carry the logical
# shape and `nbytes` rounds up.
DTYPE_BITS: dict[str, int] = {
    "fp32": 32,
    "bf16": 16,
    "fp16": 16,
    "fp8_e4m3": 8,
    "fp8_e5m2": 8,
    "int8": 8,
    "uint8": 8,
    "int32": 32,
    "int64": 64,
    "bool": 8,
    "nf4": 4,
    "fp4_e2m1": 4,
}


class Role(str, Enum):
    """What a tensor is, for the memory report and for the passes that act on one kind of tensor."""

    FROZEN_WEIGHT = "frozen_weight"
    TRAINABLE_WEIGHT = "trainable_weight"
    MASTER_WEIGHT = "master_weight"
    QUANT_WEIGHT = "quantized_weight"
    QUANT_SCALE = "quant_scale"
    DEQUANT_BUFFER = "dequant_buffer"
    GRADIENT = "gradient"
    OPTIMIZER_STATE = "optimizer_state"
    ACTIVATION = "activation"
    ACTIVATION_GRAD = "activation_gradient"
    TEMPORARY = "temporary"
    INPUT = "input"


class Space(str, Enum):
    """Where a tensor lives: device memory or pinned host memory."""

    DEVICE = "device"
    HOST = "host"


@dataclass
class Tensor:
    """One entry of the tensor table."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    role: Role
    space: Space = Space.DEVICE
    layer: int | None = None
    # Name of the weight in the Hugging Face checkpoint this tensor is loaded from, if any.
    source: str | None = None
    # Byte offset in its space's arena; set by buffer assignment.
    offset: int | None = None
    attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def numel(self) -> int:
        return math.prod(self.shape) if self.shape else 1

    @property
    def nbytes(self) -> int:
        return (self.numel * DTYPE_BITS[self.dtype] + 7) // 8


def view_parent(t: Tensor) -> str | None:
    """The tensor whose column slice `t` is (`attrs["view"]`: a view takes no memory of its own), or None."""
    view = t.attrs.get("view")
    return view["of"] if view else None


def view_root(tensors: dict[str, Tensor], name: str) -> str:
    """The tensor owning `name`'s memory: `name` itself, or the outermost parent of a (nested) column view."""
    while (p := view_parent(tensors[name])) is not None:
        name = p
    return name


def view_owners(tensors: dict[str, Tensor]) -> dict[str, str]:
    """Column view -> the tensor owning its memory (its outermost parent: views nest, a view's parent may be a
    view), over a tensor table (hazards and lifetimes go by the owner)."""
    return {n: view_root(tensors, n) for n, t in tensors.items() if view_parent(t) is not None}


def view_columns(tensors: dict[str, Tensor]) -> dict[str, list[str]]:
    """Parent -> its direct column views, in column order."""
    out: dict[str, list[str]] = {}
    for v, t in tensors.items():
        if (p := view_parent(t)) is not None:
            out.setdefault(p, []).append(v)
    for views in out.values():
        views.sort(key=lambda v: tensors[v].attrs["view"]["col"])
    return out


def view_descendants(tensors: dict[str, Tensor]) -> dict[str, list[str]]:
    """Parent -> every view inside it (its column views, theirs, ...): writing a parent writes all of them."""
    children = view_columns(tensors)
    out: dict[str, list[str]] = {}

    def walk(p: str) -> list[str]:
        if p not in out:
            out[p] = [d for c in children.get(p, ()) for d in (c, *walk(c))]
        return out[p]

    for p in children:
        walk(p)
    return out


def first_writers(ops: Iterable[Op], tensors: dict[str, Tensor]) -> dict[str, int]:
    """Tensor -> the schedule index of the first op writing it, or writing a parent it is a view of (an
    accumulating write into a view of an already written parent adds, as into the tensor itself)."""
    first: dict[str, int] = {}
    for i, op in enumerate(ops):
        for name in op.outputs:
            first.setdefault(name, i)
    inside = view_descendants(tensors)
    for name in [n for n in first if n in inside]:
        for d in inside[name]:
            first[d] = min(first.get(d, first[name]), first[name])
    return first


@dataclass
class Op:
    """One operation: reads `inputs`, writes `outputs` (tensor names), with static attributes."""

    name: str
    kind: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)
    # forward | backward | optimizer | comm | copy
    phase: str = "forward"
    layer: int | None = None


class GraphError(Exception):
    """An internal inconsistency in the IR (a compiler bug, not a user error)."""


class Graph:
    """Tensor table + op DAG. Ops are added in program order; `order` records the schedule."""

    def __init__(self) -> None:
        self.tensors: dict[str, Tensor] = {}
        self.dag: nx.DiGraph = nx.DiGraph()
        self.order: list[str] = []
        self.meta: dict[str, Any] = {}
        # tensor name -> op names that write / read it, kept in sync by add_op / remove_op so that
        # building a 64-layer graph stays linear.
        self._writers: dict[str, list[str]] = {}
        self._readers: dict[str, list[str]] = {}

    # -- tensors -----------------------------------------------------------------------------------
    def add_tensor(self, tensor: Tensor) -> Tensor:
        if tensor.name in self.tensors:
            raise GraphError(f"tensor {tensor.name!r} defined twice")
        self.tensors[tensor.name] = tensor
        return tensor

    def add_column_parent(self, name: str, members: list[str]) -> str:
        """A new [.., sum of widths] tensor whose column slices `members` become (views of it, in order), with
        the first member's dtype, role, space and layer."""
        ts = [self.tensors[m] for m in members]
        first = ts[0]
        self.add_tensor(Tensor(name, (*first.shape[:-1], sum(t.shape[-1] for t in ts)), first.dtype, first.role,
                               first.space, first.layer))
        col = 0
        for t in ts:
            t.attrs["view"] = {"of": name, "col": col}
            col += t.shape[-1]
        return name

    def tensor(self, name: str) -> Tensor:
        try:
            return self.tensors[name]
        except KeyError:
            raise GraphError(f"unknown tensor {name!r}") from None

    def update_tensor(self, name: str, **changes: Any) -> Tensor:
        self.tensors[name] = replace(self.tensors[name], **changes)
        return self.tensors[name]

    def remove_tensor(self, name: str) -> None:
        del self.tensors[name]

    # -- ops ---------------------------------------------------------------------------------------
    def add_op(self, op: Op, *, after: str | None = None) -> Op:
        """Append `op` to the program (or insert it right after op `after`) and wire its edges.

        Edges come from the writers known so far; a pass that inserts an op writing a tensor that
        earlier-added ops read should call `rewire()` when done.
        """
        if op.name in self.dag:
            raise GraphError(f"op {op.name!r} defined twice")
        for t in (*op.inputs, *op.outputs):
            if t not in self.tensors:
                raise GraphError(f"op {op.name!r} uses unknown tensor {t!r}")
        self.dag.add_node(op.name, op=op)
        for t in op.inputs:
            for producer in self._writers.get(t, ()):
                self.dag.add_edge(producer, op.name, tensor=t)
            self._readers.setdefault(t, []).append(op.name)
        for t in op.outputs:
            self._writers.setdefault(t, []).append(op.name)
        if after is None:
            self.order.append(op.name)
        else:
            self.order.insert(self.order.index(after) + 1, op.name)
        return op

    def remove_op(self, name: str) -> None:
        op = self.op(name)
        for t in op.inputs:
            self._readers[t].remove(name)
        for t in op.outputs:
            self._writers[t].remove(name)
        self.dag.remove_node(name)
        self.order.remove(name)

    def op(self, name: str) -> Op:
        return self.dag.nodes[name]["op"]

    def ops(self) -> Iterable[Op]:
        """Ops in program order."""
        return (self.dag.nodes[n]["op"] for n in self.order)

    def producers(self, tensor: str) -> list[str]:
        """Op names that write `tensor` (in insertion order)."""
        return list(self._writers.get(tensor, ()))

    def consumers(self, tensor: str) -> list[str]:
        """Op names that read `tensor` (in insertion order)."""
        return list(self._readers.get(tensor, ()))

    def rewire(self) -> None:
        """Rebuild edges and indices from the ops' inputs/outputs (after a pass rewrote tensor lists)."""
        self.dag.remove_edges_from(list(self.dag.edges))
        self._writers, self._readers = {}, {}
        for n in self.order:
            op = self.dag.nodes[n]["op"]
            for t in op.inputs:
                for w in self._writers.get(t, ()):
                    if w != n:
                        self.dag.add_edge(w, n, tensor=t)
                self._readers.setdefault(t, []).append(n)
            for t in op.outputs:
                self._writers.setdefault(t, []).append(n)

    def check(self) -> None:
        """Raise GraphError if the program reads a tensor before anything writes it (weights and inputs aside)."""
        written: set[str] = {
            t.name
            for t in self.tensors.values()
            if t.role
            in (
                Role.FROZEN_WEIGHT,
                Role.TRAINABLE_WEIGHT,
                Role.MASTER_WEIGHT,
                Role.QUANT_WEIGHT,
                Role.QUANT_SCALE,
                Role.OPTIMIZER_STATE,
                Role.INPUT,
            )
        }
        views = view_columns(self.tensors)

        def write(t: str) -> None:  # writing a parent writes its column views (and theirs)
            written.add(t)
            for v in views.get(t, ()):
                write(v)

        for op in self.ops():
            for t in op.inputs:
                if t not in written:
                    raise GraphError(f"op {op.name!r} reads {t!r} before it is written")
            for t in op.outputs:
                write(t)
                p = view_parent(self.tensors[t])
                while p is not None and all(v in written for v in views[p]):
                    written.add(p)  # and writing every column of a parent writes the parent
                    p = view_parent(self.tensors[p])
        if not nx.is_directed_acyclic_graph(self.dag):
            raise GraphError("op graph has a cycle")
