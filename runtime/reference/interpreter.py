"""The CPU reference interpreter: executes a Graph's op list in order on torch tensors held in a dict.

No arenas (the real runtime's job): each op's kernel (looked up by op kind) returns fresh tensors,
which are cast to the IR dtype of their tensor and stored by name; outputs listed in the op's
`accumulate_into` attribute are added into (gradient accumulation across ops and micro-steps).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from surogate.compiler.ir import Graph, GraphError, Role, view_columns, view_parent
from surogate.runtime.distributed.sequence import KERNELS as SEQUENCE
from surogate.runtime.reference.common import default_cu_seqlens
from surogate.runtime.reference.dtypes import TORCH_DTYPES
from surogate.runtime.reference.kernels_bwd import KERNELS as BWD
from surogate.runtime.reference.kernels_fwd import KERNELS as FWD
from surogate.runtime.reference.kernels_moe import KERNELS as MOE
from surogate.runtime.reference.kernels_quant import KERNELS as QUANT
from surogate.runtime.reference.kernels_stacked import KERNELS as STACKED

_PACKED = {"nf4", "fp4_e2m1"}
Kernel = Callable[[list, dict, Any], list]
KERNELS: dict[str, Kernel] = {**FWD, **BWD, **MOE, **QUANT, **STACKED, **SEQUENCE}


@dataclass
class OpContext:
    """What a kernel may know beyond its inputs: the step (dropout seeds) and its output shapes."""

    graph: Graph
    step: int
    out_shapes: list[tuple[int, ...]] = field(default_factory=list)

    def shape_of_output(self, i: int) -> tuple[int, ...]:
        return self.out_shapes[i]


def batch_inputs(graph: Graph, input_ids: torch.Tensor, labels: torch.Tensor,
                 position_ids: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                 num_items: int | None = None) -> dict[str, torch.Tensor]:
    """The INPUT tensors for one micro-batch (defaults: positions 0..T-1 per row, one document per row,
    loss averaged over this micro-batch's non-ignored labels)."""
    b, t = input_ids.shape
    if (b, t) != graph.tensors["input_ids"].shape:
        raise ValueError(f"batch shape {(b, t)} != graph's {graph.tensors['input_ids'].shape}")
    if position_ids is None:
        position_ids = torch.arange(t).expand(b, t)
    if cu_seqlens is None:
        cu_seqlens = default_cu_seqlens(b, t)
    elif cu_seqlens.numel() < b * t + 1:
        pad = torch.full((b * t + 1 - cu_seqlens.numel(),), int(cu_seqlens[-1]), dtype=torch.int32)
        cu_seqlens = torch.cat([cu_seqlens.to(torch.int32), pad])
    if num_items is None:
        num_items = int((labels != -100).sum())
    return {"input_ids": input_ids.to(torch.int32), "labels": labels.to(torch.int32),
            "num_items": torch.tensor(float(num_items)),
            "position_ids": position_ids.to(torch.int32), "cu_seqlens": cu_seqlens.to(torch.int32)}


def run_graph(graph: Graph, values: dict[str, torch.Tensor], *, step: int = 0,
              phases: Iterable[str] = ("forward", "backward")) -> dict[str, torch.Tensor]:
    """Execute the ops of `phases` in program order; `values` (weights, inputs, grads) is updated and returned."""
    wanted = set(phases)
    columns = view_columns(graph.tensors)  # parent -> its direct column views, in column order

    def gather(t: str) -> torch.Tensor:  # a parent whose columns were written one by one: their concatenation
        if t not in values:
            values[t] = torch.cat([gather(v) if v in columns else values[v] for v in columns[t]], dim=-1)
        return values[t]

    def scatter(t: str) -> None:  # a parent written whole: its column views (and theirs) are its slices
        for v in columns.get(t, ()):
            col = graph.tensors[v].attrs["view"]["col"]
            values[v] = values[t][..., col : col + graph.tensors[v].shape[-1]]
            scatter(v)

    for op in graph.ops():
        if op.phase not in wanted:
            continue
        for t in op.inputs:
            if t in columns:
                gather(t)
        try:
            kernel = KERNELS[op.kind]
        except KeyError:
            raise NotImplementedError(f"reference backend has no kernel for op kind {op.kind!r}") from None
        ins = [values[t] for t in op.inputs]
        ctx = OpContext(graph, step, [graph.tensors[o].shape for o in op.outputs])
        outs = kernel(ins, op.attrs, ctx)
        acc = set(op.attrs.get("accumulate_into", ()))
        if len(outs) > len(op.outputs) and all(v is None for v in outs[len(op.outputs):]):
            outs = outs[: len(op.outputs)]  # optional workspace outputs this op does not have
        for name, val in zip(op.outputs, outs, strict=True):
            if val is None:
                continue
            declared = graph.tensors[name]
            if tuple(val.shape) != declared.shape:
                raise GraphError(f"op {op.name!r} produced {name!r} with shape {tuple(val.shape)}, "
                                 f"but the graph declares {declared.shape}")
            dtype = declared.dtype
            if dtype not in _PACKED:  # sub-byte codes stay unpacked uint8 in the reference backend
                val = val.to(TORCH_DTYPES[dtype])
            if name in acc and name in values:
                values[name] = values[name] + val
            else:
                values[name] = val
            scatter(name)
            parent = view_parent(graph.tensors[name])
            while parent is not None:  # a column written: its parents' values are out of date (gathered again)
                values.pop(parent, None)
                parent = view_parent(graph.tensors[parent])
    return values


def gradients(graph: Graph, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Weight name -> accumulated gradient, for every trainable weight that received one."""
    return {t.attrs["grad_of"]: values[n] for n, t in graph.tensors.items()
            if t.role == Role.GRADIENT and n in values}
