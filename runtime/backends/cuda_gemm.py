"""GEMM-shaped and indexing kernels of the `cuda` backend: linear (+ backward, + the stacked kinds of
`group_lora_projections`), embedding, add, identity.

GEMMs go through torch (cuBLAS on a GPU) with `out=` the planned view, or `addmm_` into it when the op
accumulates. When operand dtypes differ (fp32 LoRA adapters on bf16 activations) the route is
`cuda_sizes.gemm_route`: on a GPU, bf16 tensor-core GEMMs over bf16x3 splits of the fp32 operand
(`cuda_split_gemm`, as accurate as fp32); elsewhere, or for combinations the split does not cover, the product
in the promoted dtype cast into the view (temporaries, as the reference backend does).
"""

from __future__ import annotations

from typing import Any

import torch

from surogate.runtime.backends import cuda_sizes as sz
from surogate.runtime.backends import cuda_split_gemm as csg
from surogate.runtime.backends.cuda_state import CudaState
from surogate.runtime.backends.cuda_state import dtype_name as dn
from surogate.runtime.reference.common import linear_scale
from surogate.runtime.reference.dtypes import common

TILE_ELEMENTS = sz.TILE_ELEMENTS  # output elements per block of a mixed-dtype GEMM (16 MiB of bf16)


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


_mm = csg.mm_into


def route_of(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool,
             st: CudaState | None, weight: str | None = None) -> sz.GemmRoute:
    """The route `gemm_into` takes (without a CudaState for its scratch: never a split one)."""
    split = st is not None and csg.split_enabled(out.device)
    return sz.gemm_route(a.shape[0], a.shape[1], b.shape[1], dn(a.dtype), dn(b.dtype), dn(out.dtype), accumulate,
                         split, weight)


def gemm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, accumulate: bool, alpha: float = 1.0,
              st: CudaState | None = None, route: sz.GemmRoute | None = None, weight: str | None = None,
              ctx: Any = None, owner: str | None = None) -> None:
    """out (=|+=) alpha * a @ b, written into `out` without a temporary when the output has the compute dtype.
    With `st`, mixed bf16/fp32 GEMMs on a GPU take a split route (`cuda_split_gemm`) with scratch from `st`;
    `weight` (b's split label, `cuda_sizes.split_weight`, with the run's `ctx`): b's parts are kept in a buffer
    of their own; `owner`: the weight tensor b is (not a gathered or staged copy), whose parts are then split
    again only when it is written (`CudaState.kept_split`), else once per program run."""
    if a.dtype == b.dtype == out.dtype:
        _mm(out, a, b, accumulate, alpha)
        return
    if ctx is None:
        weight = None
    route = route if route is not None else route_of(out, a, b, accumulate, st, weight)
    if route.kind != "promote":
        bufs = [st.alloc(spec, out.device) for spec in route.scratch]
        # a weight changes only when written: its parts are split at its first GEMM, then again after each
        # write of it (the optimizer step), and micro-steps only read them; a gathered or staged copy is
        # rewritten every run, so its first GEMM of the run splits it
        split = not route.cached or st.kept_split(
            route.scratch[0], owner, ctx, lambda parts=bufs[0]: csg.split_operand(route, None, b, parts))
        csg.split_gemm(out, a, b, route, bufs, accumulate, alpha, split=split)
        return
    # Mixed dtypes (bf16 activations with fp32 LoRA adapters, as PEFT computes them in fp32): the operands in the
    # promoted dtype, a block of output rows at a time so the temporaries stay small (an LM-head weight gradient
    # would otherwise need a vocab x hidden temporary). An output of the compute dtype is written by the GEMM
    # itself; otherwise the product is a temporary cast into it.
    dt = common(a, b)
    bt = b.to(dt)
    step = max(1, TILE_ELEMENTS // max(1, out.shape[1]))
    for r0 in range(0, out.shape[0], step):
        r1 = min(out.shape[0], r0 + step)
        at = a[r0:r1].to(dt)
        if out.dtype == dt:
            _mm(out[r0:r1], at, bt, accumulate, alpha)
            continue
        prod = at @ bt
        if alpha != 1.0:
            prod.mul_(alpha)
        if accumulate:
            out[r0:r1].add_(prod)
        else:
            out[r0:r1].copy_(prod)


def _split_weight(ctx: Any, name: str, transposed: bool) -> tuple[str | None, str | None]:
    """(`cuda_sizes.split_weight` in the run's plan, `name` when that is the weight itself: its `owner` for
    `gemm_into`); (None, None) for a kernel called without a plan."""
    graph = getattr(ctx, "graph", None)
    if graph is None:
        return None, None
    label = sz.split_weight(graph.tensors, name, transposed)
    return label, (name if label.removesuffix("^T") == name else None)


def linear(st: CudaState, ins: list, attrs: dict, ctx: Any) -> list:
    x, w = ins[0], ins[1]
    bias = ins[2] if len(ins) > 2 else None
    bnd = st.bind(ins, attrs, ctx)
    out, acc = bnd.views[0], bnd.accumulate[0]
    scale = linear_scale(attrs, ctx)
    o2 = _rows(out)
    x2 = _rows(x)
    acc_gemm = acc and bias is None  # (with a bias the GEMM writes a buffer the bias is added to)
    weight, owner = _split_weight(ctx, bnd.inputs[1], transposed=True)  # b = W^T
    route = route_of(o2, x2, w.t(), acc_gemm, st, weight)
    if route.kind == "promote" and x.dtype != w.dtype and common(x, w) != x.dtype:
        # bf16 activations into fp32 adapters: one conversion per run for q/k/v's (gate/up's) shared input
        x2 = st.upcast(bnd.inputs[0], x2, common(x, w), ctx)
        route = None
    if bias is None:
        gemm_into(o2, x2, w.t(), accumulate=acc, alpha=scale, st=st, route=route, weight=weight, ctx=ctx,
                  owner=owner)
    else:  # (x @ W^T + b) * scale
        tmp = st.alloc(sz.linear_bias(*o2.shape, dn(o2.dtype)), o2.device) if acc else o2
        gemm_into(tmp, x2, w.t(), accumulate=False, st=st, route=route, weight=weight, ctx=ctx, owner=owner)
        tmp.add_(bias.to(tmp.dtype))
        if scale != 1.0:
            tmp.mul_(scale)
        if acc:
            o2.add_(tmp)
    return [out]


def linear_bwd_data(st: CudaState, ins: list, attrs: dict, ctx: Any) -> list:
    dy, w = ins
    bnd = st.bind(ins, attrs, ctx)
    dx = bnd.views[0]
    weight, owner = _split_weight(ctx, bnd.inputs[1], transposed=False)
    gemm_into(_rows(dx), _rows(dy), w, accumulate=bnd.accumulate[0], alpha=float(attrs.get("scale", 1.0)), st=st,
              weight=weight, ctx=ctx, owner=owner)
    return [dx]


def linear_bwd_weight(st: CudaState, ins: list, attrs: dict, ctx: Any) -> list:
    dy, x = ins
    bnd = st.bind(ins, attrs, ctx)
    dyr = _rows(dy)
    x2 = _rows(x)
    dw, acc = bnd.views[0], bnd.accumulate[0]
    route = route_of(dw, dyr.t(), x2, acc, st)
    if route.kind == "promote" and common(dy, x) != x.dtype:
        # the adapters' fp32 gradient reads the shared bf16 input converted once per run
        x2 = st.upcast(bnd.inputs[1], x2, common(dy, x), ctx)
        route = None
    gemm_into(dw, dyr.t(), x2, accumulate=acc, alpha=float(attrs.get("scale", 1.0)), st=st, route=route)
    if len(bnd.views) > 1:  # dbias
        db = bnd.views[1]
        if bnd.accumulate[1]:
            db.add_(dyr.sum(0).to(db.dtype))
        else:
            torch.sum(dyr, 0, out=db) if dyr.dtype == db.dtype else db.copy_(dyr.float().sum(0))
    return bnd.views


def stacked_rows(ts: list[torch.Tensor]) -> torch.Tensor | None:
    """The tensors `ts` ([rows_i, ...] each, one dtype and trailing shape) as one [sum rows_i, ...] matrix when
    they lie back to back in memory (a planned stack), else None. Each contiguous, or 2D with one common row
    stride (column views of a stack of wider matrices: the [W | tail] weights of fold_lora_up_projection)."""
    first = ts[0]
    strided = not first.is_contiguous()
    if strided and (first.dim() != 2 or first.stride(1) != 1):
        return None
    at = first.data_ptr()
    for t in ts:
        if (t.data_ptr() != at or t.dtype != first.dtype or t.shape[1:] != first.shape[1:]
                or t.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
                or (t.stride() != first.stride() if strided else not t.is_contiguous())):
            return None
        at += t.shape[0] * t.stride(0) * t.element_size() if strided else t.nbytes
    return first.as_strided((sum(t.shape[0] for t in ts), *first.shape[1:]), first.stride())


def _columns(t: torch.Tensor, widths: list[int]) -> list[torch.Tensor]:
    return list(torch.split(t, widths, dim=-1))


def _stacked_weights_gemm(st: CudaState, ins: list, attrs: dict, ctx: Any, forward: bool) -> list:
    """forward: out = x @ [W_1; ...; W_n]^T (the n products side by side); else dx (=|+=) dy @ [W_1; ...; W_n]
    (dy holding the n output gradients side by side, K = sum rows). One GEMM over the planned stack; if the
    weights are not adjacent, one GEMM per weight (into out's columns / accumulated into dx)."""
    a, ws = _rows(ins[0]), ins[1:]
    bnd = st.bind(ins, attrs, ctx)
    out, acc = bnd.views[0], bnd.accumulate[0]
    o2 = _rows(out)
    scale = float(attrs.get("scale", 1.0))
    w = stacked_rows(ws)
    if w is not None:
        gemm_into(o2, a, w.t() if forward else w, accumulate=acc, alpha=scale, st=st)
        return [out]
    widths = [t.shape[0] for t in ws]
    for i, (part, wi) in enumerate(zip(_columns(o2 if forward else a, widths), ws, strict=True)):
        if forward:
            gemm_into(part, a, wi.t(), accumulate=acc, alpha=scale, st=st)
        else:
            gemm_into(o2, part, wi, accumulate=acc or i > 0, alpha=scale, st=st)
    return [out]


def linear_stacked(st: CudaState, ins: list, attrs: dict, ctx: Any) -> list:
    """h = x @ [W_1; ...; W_n]^T (`group_lora_projections`)."""
    return _stacked_weights_gemm(st, ins, attrs, ctx, forward=True)


def linear_stacked_bwd_data(st: CudaState, ins: list, attrs: dict, ctx: Any) -> list:
    """dx (=|+=) dy @ [W_1; ...; W_n]."""
    return _stacked_weights_gemm(st, ins, attrs, ctx, forward=False)


def linear_stacked_bwd_weight(st: CudaState, ins: list, attrs: dict, ctx: Any) -> list:
    """[dW_1; ...; dW_n] (=|+=) dy^T @ x into the planned stack of gradients: one GEMM."""
    dy, x = ins
    bnd = st.bind(ins, attrs, ctx)
    scale = float(attrs.get("scale", 1.0))
    dyr, x2 = _rows(dy), _rows(x)
    dw = stacked_rows(bnd.views)
    if dw is not None and len(set(bnd.accumulate)) == 1:
        gemm_into(dw, dyr.t(), x2, accumulate=bnd.accumulate[0], alpha=scale, st=st)
        return bnd.views
    for col, gi, acc in zip(_columns(dyr, [t.shape[0] for t in bnd.views]), bnd.views, bnd.accumulate, strict=True):
        gemm_into(gi, col.t(), x2, accumulate=acc, alpha=scale, st=st)
    return bnd.views


def embedding(st: CudaState, ins: list, attrs: dict, ctx: Any) -> list:
    ids, w = ins
    out = st.bind(ins, attrs, ctx).views[0]
    torch.index_select(w, 0, ids.reshape(-1), out=_rows(out))
    return [out]


def embedding_bwd(st: CudaState, ins: list, attrs: dict, ctx: Any) -> list:
    dy, ids = ins
    bnd = st.bind(ins, attrs, ctx)
    dw = bnd.views[0]
    if not bnd.accumulate[0]:
        dw.zero_()
    pad = attrs.get("padding_idx")
    if pad is not None:  # as nn.Embedding(padding_idx=...): that row never receives a gradient
        keep = st.alloc(sz.embedding_pad_row(dw.shape[1], dn(dw.dtype)), dw.device)
        keep.copy_(dw[pad])
    src = _rows(dy)
    dw.index_add_(0, ids.reshape(-1), src if src.dtype == dw.dtype else src.to(dw.dtype))
    if pad is not None:
        dw[pad].copy_(keep)
    return [dw]


def add(st: CudaState, ins: list, attrs: dict, ctx: Any) -> list:
    a, b = ins
    bnd = st.bind(ins, attrs, ctx)
    out = bnd.views[0]
    if bnd.accumulate[0]:
        out.add_(a).add_(b)
    elif b.dtype == a.dtype == out.dtype:
        torch.add(a, b, out=out)
    elif out.dtype == a.dtype:  # as the reference, b rounded to a's dtype first (a fp32 LoRA product into bf16)
        torch.add(a, b.to(a.dtype), out=out)
    else:
        out.copy_(a + b.to(a.dtype))
    return [out]


def identity(st: CudaState, ins: list, attrs: dict, ctx: Any) -> list:
    bnd = st.bind(ins, attrs, ctx)
    out = bnd.views[0]
    out.add_(ins[0]) if bnd.accumulate[0] else out.copy_(ins[0])
    return [out]


KERNELS = {
    "linear": linear,
    "linear_bwd_data": linear_bwd_data,
    "linear_bwd_weight": linear_bwd_weight,
    "linear_stacked": linear_stacked,
    "linear_stacked_bwd_data": linear_stacked_bwd_data,
    "linear_stacked_bwd_weight": linear_stacked_bwd_weight,
    "embedding": embedding,
    "embedding_bwd": embedding_bwd,
    "add": add,
    "identity": identity,
}
