"""Attention of the `cuda` backend through torch's fused attention ops, documents separated by `cu_seqlens`.

Two paths, chosen per call:
- varlen flash attention (`aten._flash_attention_forward/_backward` with cu_seqlens over the packed tokens)
  on a CUDA device for bf16/fp16 when the installed torch exposes it: no mask tensor, GQA native;
- otherwise a fused SDPA op with an additive block-diagonal causal bias built from `cu_seqlens`
  (`_scaled_dot_product_efficient_attention` on CUDA, `_scaled_dot_product_flash_attention_for_cpu` on
  CPU), keys/values expanded to the query heads.
`SUROGATE_CUDA_ATTENTION=sdpa` forces the second path (the GPU checks compare both).
The backward processes the heads in `attn_bwd_chunks` chunks of whole key/value groups.

Document slots: the plan's `cu_seqlens` holds B*T+1 entries (any packing fits), but flash attention treats
every entry as a sequence: its grids have a block row per entry and its backward allocates
(total + 128 * entries) rows of fp32 dQ accumulator (B*T = 4096 -> 4.3 GB at 16 heads x 128). So flash gets
only the first `CudaState.cu_slots` entries: a power of two >= the micro-batch's documents (+1), set from the
host copy of `cu_seqlens` when it is written (`cuda_graphs.install`), unused tail entries repeating the total
(zero-length documents). A graph is captured per slot count, so boundaries vary without re-capture.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch

from surogate.runtime.backends import cuda_sizes as sz
from surogate.runtime.backends.cuda_sizes import MIN_DOC_SLOTS, flash_bwd_bytes_per_group, flash_bwd_chunks
from surogate.runtime.backends.cuda_state import CudaState
from surogate.runtime.backends.cuda_state import dtype_name as dn

__all__ = ["MIN_DOC_SLOTS", "doc_slots", "flash_bwd_bytes_per_group", "flash_bwd_chunks", "use_flash"]

aten = torch.ops.aten


def use_flash(q: torch.Tensor) -> bool:
    """Whether this call takes the varlen flash path."""
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and hasattr(aten, "_flash_attention_forward")
            and os.environ.get("SUROGATE_CUDA_ATTENTION", "auto") != "sdpa")


def doc_slots(cu_host: torch.Tensor) -> int:
    """cu_seqlens entries flash attention needs for this (padded) host `cu_seqlens`: a power of two >=
    MIN_DOC_SLOTS documents, plus one, capped at the buffer's length."""
    cu = cu_host.reshape(-1)
    capacity = cu.numel()
    total = int(cu[-1])
    # documents end where the entries reach the total; the tail repeats it (zero-length padding)
    docs = int(torch.nonzero(cu == total)[0, 0]) if capacity > 1 else 0
    bucket = MIN_DOC_SLOTS
    while bucket < docs:
        bucket *= 2
    return min(capacity, bucket + 1)


def _flash_cu(st: CudaState, cu: torch.Tensor) -> torch.Tensor:
    n = st.cu_slots
    return cu[:n] if n is not None and n < cu.numel() else cu


@functools.cache
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _bias(st: CudaState, cu: torch.Tensor, b: int, t: int, dtype: torch.dtype, ctx: Any) -> torch.Tensor:
    """[B, 1, T, T] additive bias: 0 where query i may see key j (same document, j <= i), else -inf.

    Rebuilt in place once per program run (the first attention op of the run; captured graphs replay it)."""
    dev = cu.device
    bias_spec, doc_spec, same_spec = sz.attn_bias(b, t, dn(dtype))
    bias = st.alloc(bias_spec, dev)
    if getattr(ctx, "_cuda_bias_built", None) == (b, t, dtype):
        return bias
    tokens = st.constant(("tokens", b * t), lambda: torch.arange(b * t, dtype=torch.int32), dev)
    tril = st.constant(("tril", t), lambda: torch.ones(t, t, dtype=torch.bool).tril(), dev)
    doc = st.alloc(doc_spec, dev)
    same = st.alloc(same_spec, dev)
    torch.searchsorted(cu, tokens, right=True, out=doc)
    d = doc.view(b, t)
    torch.eq(d[:, :, None], d[:, None, :], out=same)
    same.logical_and_(tril)
    torch.logical_not(same, out=same)
    bias.zero_().view(b, t, t).masked_fill_(same, float("-inf"))
    ctx._cuda_bias_built = (b, t, dtype)
    return bias


def _heads(x: torch.Tensor, n: int) -> torch.Tensor:
    b, t, w = x.shape
    return x.view(b, t, n, w // n).transpose(1, 2)


def _expand(st: CudaState, x: torch.Tensor, rep: int, tag: str) -> torch.Tensor:
    """[B, nkv, T, D] -> [B, nkv * rep, T, D] (GQA keys/values for ops without native GQA), in scratch."""
    if rep == 1:
        return x
    b, g, t, d = x.shape
    out = st.alloc(sz.attn_expand(tag, b, g * rep, t, d, dn(x.dtype)), x.device)
    out.view(b, g, rep, t, d).copy_(x[:, :, None])
    return out


def _sdpa_fwd(q, k, v, bias, scale):
    if q.is_cuda:
        o, lse, _, _ = aten._scaled_dot_product_efficient_attention(q, k, v, bias.expand(-1, q.shape[1], -1, -1),
                                                                    True, 0.0, False, scale=scale)
        return o, lse[..., : q.shape[2]]
    return aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=bias, scale=scale)


def attention(st: CudaState, ins: list, attrs: dict, ctx: Any) -> list:
    q, k, v, cu = ins
    out, lse = st.bind(ins, attrs, ctx).views
    nh, nkv, hd = int(attrs["num_heads"]), int(attrs["num_kv_heads"]), int(attrs["head_dim"])
    b, t, _ = q.shape
    scale = float(attrs["scale"])
    if use_flash(q):
        cu = _flash_cu(st, cu)
        args = (q.view(b * t, nh, hd), k.view(b * t, nkv, hd), v.view(b * t, nkv, hd), cu, cu, t, t, 0.0,
                bool(attrs.get("causal", True)), False)
        if sz.flash_inplace():  # the output written straight into the plan's view (no temporary, no copy)
            l_ = aten._flash_attention_forward_no_dropout_inplace(out.view(b * t, nh, hd), *args, scale=scale)
        else:
            o, l_, _, _, _ = aten._flash_attention_forward(*args, scale=scale)
            out.view(b * t, nh, hd).copy_(o)
        lse.copy_(l_.view(nh, b, t).transpose(0, 1))  # varlen lse: [heads, total tokens]
        return [out, lse]
    rep = nh // nkv
    bias = _bias(st, cu, b, t, q.dtype, ctx)
    kh = _expand(st, _heads(k, nkv), rep, "attn_k")
    vh = _expand(st, _heads(v, nkv), rep, "attn_v")
    o, l_ = _sdpa_fwd(_heads(q, nh), kh, vh, bias, scale)
    out.view(b, t, nh, hd).copy_(o.transpose(1, 2))
    lse.copy_(l_)
    return [out, lse]


def attention_bwd(st: CudaState, ins: list, attrs: dict, ctx: Any) -> list:
    do, q, k, v, out, lse, cu = ins
    bnd = st.bind(ins, attrs, ctx)
    wrt = list(attrs["wrt"])
    nh, nkv, hd = int(attrs["num_heads"]), int(attrs["num_kv_heads"]), int(attrs["head_dim"])
    rep = nh // nkv
    b, t, _ = q.shape
    scale = float(attrs["scale"])
    targets = {i: (bnd.views[n], bnd.accumulate[n]) for n, i in enumerate(wrt)}
    grads = {0: (q, nh), 1: (k, nkv), 2: (v, nkv)}
    flash = use_flash(q)
    if flash:
        cu = _flash_cu(st, cu)
        lse_n = st.alloc(sz.attn_lse_native(nh, b * t), q.device)
        lse_n.view(nh, b, t).copy_(lse.transpose(0, 1))
        rng = st.constant(("flash_rng",), lambda: torch.zeros(2, dtype=torch.int64), q.device)
        q3, k3, v3 = q.view(b * t, nh, hd), k.view(b * t, nkv, hd), v.view(b * t, nkv, hd)
        do3, o3 = do.view(b * t, nh, hd), out.view(b * t, nh, hd)
    else:
        bias = _bias(st, cu, b, t, q.dtype, ctx)
        qh, kh, vh = _heads(q, nh), _heads(k, nkv), _heads(v, nkv)
        doh, oh = _heads(do, nh), _heads(out, nh)
        zero = st.constant(("philox0",), lambda: torch.zeros((), dtype=torch.int64), q.device)
    chunks = int(attrs.get("chunks", 1))
    if flash and len(bnd.views) > len(wrt):  # the planned fp32 workspace bounds flash's own temporaries
        ws = bnd.views[len(wrt)]
        chunks = flash_bwd_chunks(b * t, cu.numel() - 1, nh, nkv, hd, ws.numel() * ws.element_size(), chunks,
                                  _multiprocessors(q.device.index or 0))
    for g0, g1 in sz.chunks(nkv, chunks):
        h0, h1 = g0 * rep, g1 * rep
        if flash:
            dq, dk, dv = aten._flash_attention_backward(
                do3[:, h0:h1], q3[:, h0:h1], k3[:, g0:g1], v3[:, g0:g1], o3[:, h0:h1], lse_n[h0:h1], cu, cu, t, t,
                0.0, bool(attrs.get("causal", True)), rng, rng, scale=scale)
            parts = {0: dq.view(b, t, h1 - h0, hd), 1: dk.view(b, t, g1 - g0, hd), 2: dv.view(b, t, g1 - g0, hd)}
        else:
            kc = _expand(st, kh[:, g0:g1], rep, "attn_kc")
            vc = _expand(st, vh[:, g0:g1], rep, "attn_vc")
            args = (doh[:, h0:h1], qh[:, h0:h1], kc, vc)
            lc = lse[:, h0:h1]
            if q.is_cuda:
                lpad = st.alloc(sz.attn_lse_pad(b, h1 - h0, t), q.device, zero=True)
                lpad[..., :t].copy_(lc)
                dq, dk, dv, _ = aten._scaled_dot_product_efficient_attention_backward(
                    *args, bias.expand(-1, h1 - h0, -1, -1), oh[:, h0:h1], lpad, zero, zero, 0.0,
                    [True, True, True, False], False, scale=scale)
            else:
                dq, dk, dv = aten._scaled_dot_product_flash_attention_for_cpu_backward(
                    *args, oh[:, h0:h1], lc, 0.0, False, attn_mask=bias, scale=scale)
            g = g1 - g0
            parts = {0: dq.transpose(1, 2),
                     1: dk.view(b, g, rep, t, hd).sum(2).transpose(1, 2),
                     2: dv.view(b, g, rep, t, hd).sum(2).transpose(1, 2)}
        for i, (view, acc) in targets.items():
            n_heads = grads[i][1]
            lo, hi = (h0, h1) if i == 0 else (g0, g1)
            dst = view.view(b, t, n_heads, hd)[:, :, lo:hi]
            dst.add_(parts[i]) if acc else dst.copy_(parts[i])
    return bnd.views


KERNELS = {"attention": attention, "attention_bwd": attention_bwd}
