"""FP8 kernels of the `cuda` backend (recipe `fp8_hybrid`): quantize with delayed scaling and the three qlinear
GEMMs on FP8 tensor cores.

- `quantize` (format fp8_tensor): amax (Numba), the delayed scale from the amax history with the push
  (one-thread Numba kernel: no host synchronisation, so it can sit in a CUDA graph), the E4M3 codes (Numba,
  x / scale as the reference divides: codes bit for bit equal to it).
- `qlinear`: y = (x_q @ W_q^T) * s_x * s_w by `torch._scaled_mm` (cuBLASLt FP8, fp32 accumulation, one
  rounding into the output dtype, bias in the epilogue) straight into the planned view.
- `qlinear_bwd_data` / `qlinear_bwd_weight`: dY rounded through its fp8 format (E5M2 unless `gradient_dtype`
  says E4M3) with a just-in-time scale, then dX = dY_q @ W_q and dW = dY_q^T @ x_q as FP8 GEMMs. cuBLASLt's FP8
  GEMMs take A row-major and B column-major, so W_q, dY_q and x_q are transposed into scratch codes (1 byte per
  element) where the product needs it.

The reference (runtime/reference/kernels_quant.py) dequantizes and multiplies in fp32; the codes and scales here
are the same bits, the GEMMs differ only in accumulation order. Other formats (fp4), operand dims that are not
multiples of 16 on a GPU, GPUs below compute capability 8.9, ZeRO-3 shard writes (`keep_rank_rows`) and
SUROGATE_FP8_GEMM=0 run the reference math on the device (`op_is_native` says which; CUDA graphs stay off for those).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from surogate.numba_kernels import KERNELS as NK
from surogate.numba_kernels.fp8 import FORMATS as FP8_CODES  # format -> (torch dtype, largest value)
from surogate.runtime.backends import cuda_sizes as sz
from surogate.runtime.backends.cuda_state import CudaState, _plan_ops, run_token
from surogate.runtime.backends.cuda_state import dtype_name as dn
from surogate.runtime.reference import kernels_quant as ref
from surogate.runtime.reference.quant import FP8_MAX

E4M3 = torch.float8_e4m3fn
AMAX_FLOOR = 1e-12  # the reference's delayed-scaling floor (activations, weights)
GRAD_FLOOR = 1e-30  # and its just-in-time floor for output gradients


@functools.cache
def _capability(device: str) -> tuple[int, int]:
    return torch.cuda.get_device_capability(torch.device(device))


def _native(fmt: str | None, dims: tuple[int, ...], *tensors: torch.Tensor) -> bool:
    dev = tensors[0].device
    cuda = dev.type == "cuda"
    return sz.fp8_native(fmt, dims, [dn(t.dtype) for t in tensors], cuda, _capability(str(dev)) if cuda else (0, 0))


def _reference(kind: str, ins: list, attrs: dict, ctx: Any) -> list:
    """The reference kernel on the inputs' device (the executor copies its fresh outputs into the arena)."""
    dev = next(t.device for t in ins if isinstance(t, torch.Tensor))
    with torch.device(dev):
        return ref.KERNELS[kind](ins, attrs, ctx)


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def quantize(st: CudaState, ins: list, attrs: dict, ctx: Any) -> list:
    """fp8_tensor: delayed-scaling E4M3 codes and their dequantization scale (the history advanced in place)."""
    src = ins[0]
    if (attrs.get("keep_rank_rows") or len(ins) < 2 or not src.is_contiguous()
            or not _native(attrs.get("format"), (), src)):
        return _reference("quantize", ins, attrs, ctx)
    hist = ins[1]
    bnd = st.bind(ins, attrs, ctx)
    codes, scale = bnd.views[0], bnd.views[1]
    amax = st.alloc(sz.fp8_amax_slot(), src.device)
    NK["fp8_amax"].cuda(src, amax)
    window, push = ref.amax_window_slots(hist.numel(), attrs, ctx)
    NK["fp8_delayed_scale"].cuda(amax, hist, scale, window, AMAX_FLOOR, FP8_MAX, push)
    NK["fp8_quantize"].cuda(src, codes.view(torch.uint8), scale, "e4m3", divide=True)
    return [codes, scale]


def _scaled_mm_into(st: CudaState, out: torch.Tensor, acc: bool, a: torch.Tensor, b: torch.Tensor,
                    sa: torch.Tensor, sb: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """out (=|+=) (a @ b) * sa * sb (+ bias): an FP8 GEMM written into the planned view `out` (its rows flattened;
    through a scratch of its shape when accumulating: the GEMM itself cannot add into its output)."""
    target = st.alloc(sz.acc_buffer("fp8_gemm_acc", tuple(out.shape), dn(out.dtype)), out.device) if acc else out
    out, target = _rows(out), _rows(target)
    fused = bias if bias is not None and bias.dtype == out.dtype and out.dtype != torch.float32 else None
    torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, bias=fused, out_dtype=out.dtype, out=target)
    if bias is not None and fused is None:
        target.add_(bias)
    if acc:
        out.add_(target)


def qlinear(st: CudaState, ins: list, attrs: dict, ctx: Any) -> list:
    """y = x_q @ W_q^T (* scales) (+ bias) on FP8 tensor cores."""
    inp, _, xq, xs, wq, ws = ins[:6]
    bias = ins[6] if len(ins) > 6 else None
    bnd = st.bind(ins, attrs, ctx)
    out, acc = bnd.views[0], bnd.accumulate[0]
    k, n = xq.shape[-1], wq.shape[0]
    m = xq.numel() // k
    if not (out.is_contiguous() and _native(attrs.get("format"), (m, k, n), xq, wq, out)):
        return _reference("qlinear", ins, attrs, ctx)
    _scaled_mm_into(st, out, acc, _rows(xq), wq.t(), xs, ws, bias)
    return [out]


BACKWARD_KINDS = ("qlinear_bwd_data", "qlinear_bwd_weight")


def dy_reuse(ops: Any, tensors: dict) -> frozenset[str]:
    """Backward ops that may read the dY codes an earlier backward op made: the same dY and format, and no op in
    between writes dY's memory (a residual gradient is accumulated in place: the down and o projections read one
    tensor at two different values)."""
    from surogate.compiler.ir import view_root

    last: dict[str, str] = {}  # dY's memory (view root) -> grad format of the codes made from it
    ok = set()
    for op in ops:
        if op.kind in BACKWARD_KINDS and op.attrs.get("grad_format") in sz.FP8_FORMATS:
            root = view_root(tensors, op.inputs[0])
            if last.get(root) == op.attrs["grad_format"]:
                ok.add(op.name)
            last[root] = op.attrs["grad_format"]
        for out in op.outputs:
            last.pop(view_root(tensors, out), None)
    return frozenset(ok)


def _grad_codes(st: CudaState, dy: torch.Tensor, bnd: Any, attrs: dict,
                ctx: Any) -> tuple[torch.Tensor, torch.Tensor, str]:
    """dY [rows, cols] (the first input of the op bound in `bnd`) rounded through its fp8 format with a just-in-time
    scale: (codes uint8, scale, format)."""
    fmt = sz.FP8_FORMATS[attrs["grad_format"]]
    codes_spec, scale_spec = sz.fp8_grad_codes(*dy.shape)
    codes, scale = st.alloc(codes_spec, dy.device), st.alloc(scale_spec, dy.device)
    # a projection's two backward GEMMs read one dY: the second reuses the first one's codes when the plan says dY
    # was not written in between (`dy_reuse`) and the slot still holds them (same tensor, same run); under capture
    # the decision is recorded with the replay's ops
    owner = (bnd.inputs[0], fmt, run_token(ctx))
    reusable = st._per_plan("fp8_dy_reuse", ctx.graph, lambda g: dy_reuse(_plan_ops(g), g.tensors))
    if bnd.op in reusable and st.fp8_grad_owner.get(codes_spec) == owner:
        return codes, scale, fmt
    st.fp8_grad_owner[codes_spec] = owner
    amax = st.alloc(sz.fp8_amax_slot(), dy.device)
    NK["fp8_amax"].cuda(dy, amax)
    NK["fp8_delayed_scale"].cuda(amax, amax, scale, (0, 0), GRAD_FLOOR, FP8_CODES[fmt][1], False)
    NK["fp8_quantize"].cuda(dy, codes, scale, fmt, divide=True)
    return codes, scale, fmt


def _transposed(st: CudaState, tag: str, codes: torch.Tensor) -> torch.Tensor:
    """codes [r, c] (uint8 view) copied into a [c, r] scratch."""
    t = st.alloc(sz.fp8_transposed(tag, *codes.shape), codes.device)
    t.copy_(codes.t())
    return t


def _grad_ok(attrs: dict, dy: torch.Tensor) -> bool:
    return attrs.get("grad_format") in sz.FP8_FORMATS and dy.is_contiguous()


def qlinear_bwd_data(st: CudaState, ins: list, attrs: dict, ctx: Any) -> list:
    """dX = dY_q @ W_q (* scales)."""
    dy, wq, ws = ins
    bnd = st.bind(ins, attrs, ctx)
    out, acc = bnd.views[0], bnd.accumulate[0]
    n = dy.shape[-1]
    k = wq.numel() // n
    m = dy.numel() // n
    if not (_grad_ok(attrs, dy) and out.is_contiguous()
            and _native(attrs.get("format"), (m, k, n), dy, wq, out)):
        return _reference("qlinear_bwd_data", ins, attrs, ctx)
    codes, gs, fmt = _grad_codes(st, _rows(dy), bnd, attrs, ctx)
    w_t = _transposed(st, "fp8_w_t", wq.view(torch.uint8).reshape(n, k))  # [k, n]: W as a column-major [n, k]
    _scaled_mm_into(st, out, acc, codes.view(FP8_CODES[fmt][0]), w_t.view(E4M3).t(), gs, ws)
    return [out]


def qlinear_bwd_weight(st: CudaState, ins: list, attrs: dict, ctx: Any) -> list:
    """dW = dY_q^T @ x_q (* scales); the bias gradient (if any) is the column sum of the rounded dY."""
    dy, xq, xs = ins
    bnd = st.bind(ins, attrs, ctx)
    dw, acc = bnd.views[0], bnd.accumulate[0]
    n, k = dy.shape[-1], xq.shape[-1]
    m = dy.numel() // n
    if not (_grad_ok(attrs, dy) and dw.is_contiguous() and xq.is_contiguous()
            and _native(attrs.get("format"), (m, k, n), dy, xq, dw)):
        return _reference("qlinear_bwd_weight", ins, attrs, ctx)
    codes, gs, fmt = _grad_codes(st, _rows(dy), bnd, attrs, ctx)
    dy_t = _transposed(st, "fp8_dy_t", codes)  # [n, m]: dY^T row-major
    x_t = _transposed(st, "fp8_x_t", xq.view(torch.uint8).reshape(m, k))  # [k, m]: x as a column-major [m, k]
    _scaled_mm_into(st, dw, acc, dy_t.view(FP8_CODES[fmt][0]), x_t.view(E4M3).t(), gs, xs)
    outs = [dw]
    if attrs.get("has_bias"):
        db, acc_b = bnd.views[1], bnd.accumulate[1]
        col = (codes.view(FP8_CODES[fmt][0]).float() * gs).sum(0)  # (a [rows, out] fp32 temporary: biases are rare)
        db.add_(col.to(db.dtype)) if acc_b else db.copy_(col)
        outs.append(db)
    return outs


KERNELS = {"quantize": quantize, "qlinear": qlinear, "qlinear_bwd_data": qlinear_bwd_data,
           "qlinear_bwd_weight": qlinear_bwd_weight}


def op_is_native(kind: str, attrs: dict, shapes: list[tuple[int, ...]], dtypes: list[str], cuda: bool,
                 capability: tuple[int, int]) -> bool:
    """Whether the op (kind, attrs, its input shapes and dtypes, then its first output's dtype) runs the kernels
    above rather than the reference math: what the kernels decide at run time, from the plan (CUDA graphs and
    the workspace pass ask)."""
    fmt = attrs.get("format")
    if kind == "quantize":
        return not attrs.get("keep_rank_rows") and len(shapes) >= 2 and sz.fp8_native(fmt, (), dtypes[:1], cuda,
                                                                                       capability)
    if kind in ("qlinear_bwd_data", "qlinear_bwd_weight") and attrs.get("grad_format") not in sz.FP8_FORMATS:
        return False
    dims = gemm_dims(kind, shapes)
    if dims is None:
        return False
    use = {"qlinear": (2, 4), "qlinear_bwd_data": (0, 1), "qlinear_bwd_weight": (0, 1)}[kind]
    return sz.fp8_native(fmt, dims, [dtypes[i] for i in use] + dtypes[-1:], cuda, capability)


def plan_op_is_native(op: Any, tensors: dict, cuda: bool, capability: tuple[int, int]) -> bool:
    """`op_is_native` for a plan op (its inputs' and first output's shapes and dtypes from `tensors`)."""
    ins = [tensors[n] for n in op.inputs]
    return op_is_native(op.kind, op.attrs, [tuple(t.shape) for t in ins],
                        [t.dtype for t in ins] + [tensors[op.outputs[0]].dtype], cuda, capability)


def gemm_dims(kind: str, shapes: list[tuple[int, ...]]) -> tuple[int, int, int] | None:
    """(m, k, n) of a qlinear kind's GEMM from its input shapes (None for other kinds)."""
    import math

    if kind == "qlinear":
        k, n = shapes[2][-1], shapes[4][0]
        return math.prod(shapes[2]) // k, k, n
    if kind == "qlinear_bwd_data":
        n = shapes[0][-1]
        return math.prod(shapes[0]) // n, math.prod(shapes[1]) // n, n
    if kind == "qlinear_bwd_weight":
        n, k = shapes[0][-1], shapes[1][-1]
        return math.prod(shapes[0]) // n, k, n
    return None
