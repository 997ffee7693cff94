"""Element-wise and row kernels of the `cuda` backend, launched through the `numba_kernels` registry.

RMSNorm, RoPE, SwiGLU, dropout and NF4 dequantization run as Numba-CUDA
kernels (`KERNELS[name].cuda`) on torch's current stream, writing into the planned views. Under
NUMBA_ENABLE_CUDASIM=1 the same launchers run on CPU tensors (the tests of this backend). The fused LM-head
cross-entropy ops are in `cuda_ce`.
"""

from __future__ import annotations

from typing import Any

import torch

from surogate.numba_kernels import KERNELS as NK
from surogate.numba_kernels.rmsnorm import rmsnorm_bwd_workspace_shape
from surogate.runtime.backends import cuda_sizes as sz
from surogate.runtime.backends.cuda_state import CudaState
from surogate.runtime.backends.cuda_state import dtype_name as dn


def _k(name: str):
    return NK[name].cuda


def _into(st: CudaState, view: torch.Tensor, accumulate: bool, tag: str) -> torch.Tensor:
    """Where a kernel should write: the view itself, or a scratch buffer that is then added into it."""
    return st.alloc(sz.acc_buffer(tag, tuple(view.shape), dn(view.dtype)), view.device) if accumulate else view


def _flush(view: torch.Tensor, buf: torch.Tensor) -> None:
    if buf is not view:
        view.add_(buf)


# -- RMSNorm --------------------------------------------------------------------------------------------
def _groups(x: torch.Tensor, attrs: dict) -> torch.Tensor:
    g = attrs.get("group") or x.shape[-1]
    return x.reshape(-1, g)


def _ones(st: CudaState, h: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return st.constant(("ones", h, dtype), lambda: torch.ones(h, dtype=dtype), device)


def rmsnorm(st: CudaState, ins: list, attrs: dict, ctx: Any) -> list:
    x, w = ins
    bnd = st.bind(ins, attrs, ctx)
    out = bnd.views[0]
    x2 = _groups(x, attrs)
    rstd = st.alloc(sz.rms_rstd(x2.shape[0]), x.device)
    buf = _into(st, out, bnd.accumulate[0], "rms_acc")
    _k("rmsnorm_fwd")(x2, w, buf.view(x2.shape), rstd, float(attrs["eps"]))  # (out may be a strided view)
    _flush(out, buf)
    return [out]


def add_rmsnorm(st: CudaState, ins: list, attrs: dict, ctx: Any) -> list:
    """sum = a + b and out = RMSNorm(sum) * w in one launch (the kernel's fused residual)."""
    a, b, w = ins
    bnd = st.bind(ins, attrs, ctx)
    out, summed = bnd.views
    if any(bnd.accumulate) or attrs.get("group"):  # fuse_add_rmsnorm fuses neither: a plan from elsewhere
        raise ValueError("add_rmsnorm: accumulating or grouped outputs are not supported (fuse_add_rmsnorm "
                         "never emits them)")
    h = a.shape[-1]
    rstd = st.alloc(sz.rms_rstd(a.numel() // h), a.device)
    _k("rmsnorm_fwd")(a.reshape(-1, h), w, out.view(-1, h), rstd, float(attrs["eps"]),
                      residual=b.reshape(-1, h), sum_out=summed.reshape(-1, h))
    return [out, summed]


def rmsnorm_rope(st: CudaState, ins: list, attrs: dict, ctx: Any) -> list:
    """out = rope(RMSNorm(x) * w) per head in one launch (the norm kernel's rope epilogue, or the pair where the
    head does not fit it: rmsnorm.rmsnorm_rope_forward)."""
    x, w, pos, cos, sin = ins
    bnd = st.bind(ins, attrs, ctx)
    out = bnd.views[0]
    if bnd.accumulate[0]:  # fuse_rmsnorm_rope never emits it: a plan from elsewhere
        raise ValueError("rmsnorm_rope: an accumulating output is not supported (fuse_rmsnorm_rope never emits one)")
    d = int(attrs["head_dim"])
    b, t, width = x.shape
    rstd = st.alloc(sz.rms_rstd(b * t * (width // d)), x.device)
    _k("rmsnorm_rope_fwd")(x.reshape(b * t, width // d, d), w, out.view(b * t, width // d, d), rstd,
                           float(attrs["eps"]), pos.reshape(-1), cos, sin)
    return [out]


def _rms_bwd_scratch(st: CudaState, x2: torch.Tensor, w: torch.Tensor, attrs: dict
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(dweight, its partials workspace: one row per block) of a norm backward over the rows of x2."""
    rows, h = x2.shape
    dw = st.alloc(sz.rms_dw(attrs.get("fwd_op"), h, dn(w.dtype)), x2.device)
    return dw, st.alloc(sz.rms_ws(rows, h, rmsnorm_bwd_workspace_shape(rows)[0]), x2.device)


def _keep_dw(ctx: Any, attrs: dict, dw: torch.Tensor) -> None:
    """The norm backward's launch summed dweight: the matching rmsnorm_bwd_weight op of this run reuses it."""
    ctx.__dict__.setdefault("_cuda_rms_dw", {})[attrs.get("fwd_op")] = dw


def _rms_backward(st: CudaState, dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, attrs: dict,
                  ds: torch.Tensor, dres: torch.Tensor | None, want_dw: bool = True) -> torch.Tensor:
    x2 = _groups(x, attrs)
    rows, h = x2.shape
    dw, ws = _rms_bwd_scratch(st, x2, w, attrs)
    # rstd=None: the kernel recomputes it from x in its own pass (the plan keeps no rstd tensor)
    _k("rmsnorm_bwd")(dy.view(rows, h), x2, w, None, ds.reshape(rows, h), dw if want_dw else None,
                      dres.reshape(rows, h) if dres is not None else None, ws, float(attrs["eps"]))
    return dw


def _wants_dw(st: CudaState, attrs: dict, ctx: Any) -> bool:
    """Whether this norm backward's dweight is read (an rmsnorm_bwd_weight op of the plan reuses it); a plan we
    cannot see gets it."""
    graph = getattr(ctx, "graph", None)
    return graph is None or attrs.get("fwd_op") in st.norm_weight_grads(graph)


def rmsnorm_bwd(st: CudaState, ins: list, attrs: dict, ctx: Any) -> list:
    dy, x, w = ins
    bnd = st.bind(ins, attrs, ctx)
    dx = bnd.views[0]
    # accumulate: dx = grad + dx (the kernel's `dresidual` input reads the old value element by element)
    _keep_dw(ctx, attrs, _rms_backward(st, dy, x, w, attrs, dx, dx if bnd.accumulate[0] else None,
                                       _wants_dw(st, attrs, ctx)))
    return [dx]


def rmsnorm_rope_bwd(st: CudaState, ins: list, attrs: dict, ctx: Any) -> list:
    """dx of rmsnorm_rope: the norm backward kernel with rope's backward as its prologue (one launch + the dweight
    column sum; rmsnorm.rmsnorm_rope_backward)."""
    dout, x, w, pos, cos, sin = ins
    bnd = st.bind(ins, attrs, ctx)
    dx = bnd.views[0]
    if bnd.accumulate[0]:  # fuse_rmsnorm_rope never emits it: a plan from elsewhere
        raise ValueError("rmsnorm_rope_bwd: an accumulating output is not supported (fuse_rmsnorm_rope never "
                         "emits one)")
    d = int(attrs["head_dim"])
    b, t, width = x.shape
    dw, ws = _rms_bwd_scratch(st, _groups(x, attrs), w, attrs)  # rows: heads (group = head_dim)
    shape = (b * t, width // d, d)
    _k("rmsnorm_rope_bwd")(dout.reshape(shape), x.reshape(shape), w, dx.view(shape),
                           dw if _wants_dw(st, attrs, ctx) else None, ws, float(attrs["eps"]), pos.reshape(-1), cos, sin)
    _keep_dw(ctx, attrs, dw)
    return [dx]


def rmsnorm_bwd_weight(st: CudaState, ins: list, attrs: dict, ctx: Any) -> list:
    dy, x = ins
    bnd = st.bind(ins, attrs, ctx)
    dweight = bnd.views[0]
    h = _groups(x, attrs).shape[1]
    dw = ctx.__dict__.get("_cuda_rms_dw", {}).get(attrs.get("fwd_op"))
    # dy and x are this op's inputs, hence unchanged since rmsnorm_bwd read them
    if dw is None:
        ones = _ones(st, h, x.dtype, x.device)  # dweight = sum(dy * xhat) does not depend on the weight
        ds = st.alloc(sz.rms_ds(tuple(x.shape), dn(x.dtype)), x.device)
        dw = _rms_backward(st, dy, x, ones, {**attrs, "fwd_op": None}, ds, None)
    if bnd.accumulate[0]:
        dweight.add_(dw.to(dweight.dtype))
    else:
        dweight.copy_(dw)
    return [dweight]


# -- RoPE -----------------------------------------------------------------------------------------------
def _inv_freq(st: CudaState, attrs: dict, device: torch.device) -> torch.Tensor:
    inv = tuple(float(f) for f in attrs["inv_freq"])
    return st.constant(("inv_freq", inv), lambda: torch.tensor(inv, dtype=torch.float32), device)


def _rope(st: CudaState, ins: list, attrs: dict, ctx: Any, direction: str) -> list:
    x, pos = ins[0], ins[1]
    bnd = st.bind(ins, attrs, ctx)
    out = bnd.views[0]
    d = int(attrs["head_dim"])
    b, t, w = x.shape
    buf = _into(st, out, bnd.accumulate[0], "rope_acc")
    args = (x.reshape(b * t, w // d, d), buf.view(b * t, w // d, d), pos.reshape(-1))
    if len(ins) >= 4 and ins[2] is not None:  # precomputed tables (use_fused_rope: false)
        _k(f"rope_{direction}")(*args, ins[2], ins[3])
    else:
        _k(f"rope_fused_{direction}")(*args, _inv_freq(st, attrs, x.device), float(attrs.get("attention_scaling", 1.0)))
    _flush(out, buf)
    return [out]


def rope(st: CudaState, ins: list, attrs: dict, ctx: Any) -> list:
    return _rope(st, ins, attrs, ctx, "fwd")


def rope_bwd(st: CudaState, ins: list, attrs: dict, ctx: Any) -> list:
    return _rope(st, ins, attrs, ctx, "bwd")


def rope_table(st: CudaState, ins: list, attrs: dict, ctx: Any) -> list:
    """The fp32 cos/sin tables, once per micro-step (the executor copies them into their views)."""
    from surogate.numba_kernels.rope import rope_tables_ref

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    inv = _inv_freq(st, attrs, device)
    key = ("rope_table", tuple(float(f) for f in attrs["inv_freq"]), int(attrs["positions"]),
           float(attrs.get("attention_scaling", 1.0)))
    # computed once per device and cached: every later micro-step is a device-to-device copy (capturable)
    cos = st.constant(key + ("cos",), lambda: rope_tables_ref(inv, key[2], key[3])[0], device)
    sin = st.constant(key + ("sin",), lambda: rope_tables_ref(inv, key[2], key[3])[1], device)
    return [cos, sin]


# -- SwiGLU ---------------------------------------------------------------------------------------------
def swiglu(st: CudaState, ins: list, attrs: dict, ctx: Any) -> list:
    g, u = ins
    bnd = st.bind(ins, attrs, ctx)
    out = bnd.views[0]
    buf = _into(st, out, bnd.accumulate[0], "swiglu_acc")
    _k("swiglu_fwd")(g, u, buf)
    _flush(out, buf)
    return [out]


def swiglu_bwd(st: CudaState, ins: list, attrs: dict, ctx: Any) -> list:
    dy, g, u = ins
    bnd = st.bind(ins, attrs, ctx)
    wrt = list(attrs.get("wrt", (0, 1)))
    targets = {}
    for k, i in enumerate(wrt):
        targets[i] = _into(st, bnd.views[k], bnd.accumulate[k], f"swiglu_d{i}")
    dg = targets.get(0) if 0 in targets else st.alloc(sz.acc_buffer("swiglu_d0", tuple(g.shape), dn(g.dtype)), g.device)
    du = targets.get(1) if 1 in targets else st.alloc(sz.acc_buffer("swiglu_d1", tuple(u.shape), dn(u.dtype)), u.device)
    _k("swiglu_bwd")(dy, g, u, dg, du)
    for k, i in enumerate(wrt):
        _flush(bnd.views[k], targets[i])
    return bnd.views


# -- dropout --------------------------------------------------------------------------------------------
def _dropout(st: CudaState, ins: list, attrs: dict, ctx: Any) -> list:
    bnd = st.bind(ins, attrs, ctx)
    out = bnd.views[0]
    buf = _into(st, out, bnd.accumulate[0], "dropout_acc")
    p = float(attrs["p"])
    x = ins[0]
    if p == 0.0:
        buf.copy_(x)
    else:  # counter-based mask from (seed, step): forward, recompute and backward regenerate the same one; the
        # step is read on the device (st.step_index), so a captured micro-step replays with each step's mask
        # `scaled: False`: the mask alone (the LoRA GEMM reading the output applies 1 / (1 - p))
        _k("lora_dropout")(x, buf, p, int(attrs["seed"]), 0, step=st.step_index(ctx, x.device),
                           scale=None if attrs.get("scaled", True) else 1.0,
                           token_shard=getattr(ctx, "token_shard", (0, 1)))
    _flush(out, buf)
    return [out]


dropout = _dropout
dropout_bwd = _dropout


# -- QLoRA dequantization ---------------------------------------------------------------------------------
def _table(st: CudaState, name: str, device: torch.device) -> torch.Tensor:
    from surogate.runtime.reference import quant

    return st.constant(("quant_table", name), lambda: getattr(quant, name).float(), device)


def dequant(st: CudaState, ins: list, attrs: dict, ctx: Any) -> list:
    """The reference format math (`reference.quant.dequantize`). NF4 and FP4 (4-bit codes, unpacked one per byte
    by the executor) run as one Numba pass (`numba_kernels.lut_dequant`: table lookup times the block scale,
    double-quantized NF4 scales recovered on the fly); FP8 formats as the reference math on the device."""
    from surogate.compiler.ops.quant import DOUBLE_QUANT_GROUP, NVFP4_BLOCK
    from surogate.numba_kernels.lut_dequant import lut_dequantize
    from surogate.runtime.reference import quant

    bnd = st.bind(ins, attrs, ctx)
    out = bnd.views[0]
    fmt, block, shape = attrs["format"], int(attrs["block_size"]), tuple(attrs["shape"])
    if fmt in ("nf4", "fp4", "fp4_block") and out.dtype in (torch.float32, torch.bfloat16) and out.is_contiguous():
        buf = _into(st, out, bnd.accumulate[0], "dequant_acc")
        codes = ins[0] if ins[0].dtype == torch.uint8 else ins[0].to(torch.uint8)
        if fmt == "nf4":
            table = _table(st, "NF4_CODE", out.device)
            if attrs.get("double_quant", False):
                lut_dequantize(codes, table, ins[1], block, buf, s2=ins[2][:-1], offset=ins[2][-1:],
                               group=DOUBLE_QUANT_GROUP)
            else:
                lut_dequantize(codes, table, ins[1] if ins[1].dtype == torch.float32 else ins[1].float(), block, buf)
        else:  # fp8 block scales (times the fp32 global scale for `fp4`): a small fp32 temporary, one per 16 codes
            scale = ins[1].float() * ins[2].float() if fmt == "fp4" else ins[1].float()
            lut_dequantize(codes, _table(st, "E2M1", out.device), scale, NVFP4_BLOCK, buf)
        _flush(out, buf)
        return [out]
    res = quant.dequantize(fmt, list(ins), shape, block, attrs.get("double_quant", False))
    if bnd.accumulate[0]:
        out.add_(res.view(out.shape).to(out.dtype))
    else:
        out.copy_(res.view(out.shape))
    return [out]


KERNELS = {
    "rmsnorm": rmsnorm,
    "add_rmsnorm": add_rmsnorm,
    "rmsnorm_rope": rmsnorm_rope,
    "rmsnorm_rope_bwd": rmsnorm_rope_bwd,
    "rmsnorm_bwd": rmsnorm_bwd,
    "rmsnorm_bwd_weight": rmsnorm_bwd_weight,
    "rope": rope,
    "rope_bwd": rope_bwd,
    "rope_table": rope_table,
    "swiglu": swiglu,
    "swiglu_bwd": swiglu_bwd,
    "dropout": dropout,
    "dropout_bwd": dropout_bwd,
    "dequant": dequant,
}
