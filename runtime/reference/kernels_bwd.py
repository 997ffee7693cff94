"""Backward kernels of the CPU reference backend (hand-written VJPs, no torch.autograd).

Outputs follow the op's `wrt` attribute (which inputs get a gradient); the interpreter adds into
outputs listed in `accumulate_into`.
"""

from __future__ import annotations

from typing import Any

import torch

from surogate.runtime.reference.common import heads, merge_heads, rotate_half_t
from surogate.runtime.reference.dtypes import common
from surogate.runtime.reference.kernels_fwd import CEChunks, attention_probs, cos_sin, dropout, rms_normalize

Tensors = list[torch.Tensor | None]


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def embedding_bwd(x: Tensors, a: dict, ctx: Any) -> Tensors:
    dy, ids = x
    vocab = ctx.shape_of_output(0)[0]
    dw = torch.zeros(vocab, dy.shape[-1], dtype=torch.float32)
    dw.index_add_(0, ids.reshape(-1).long(), _rows(dy).float())
    if a.get("padding_idx") is not None:  # as nn.Embedding(padding_idx=...): that row is never trained
        dw[a["padding_idx"]] = 0
    return [dw]


def rmsnorm_bwd(x: Tensors, a: dict, ctx: Any) -> Tensors:
    dy, inp, w = x
    group = a.get("group")
    r_in = inp.float().unflatten(-1, (-1, group)) if group else inp.float()
    g = dy.float().unflatten(-1, (-1, group)) * w.float() if group else dy.float() * w.float()
    rstd = torch.rsqrt(r_in.pow(2).mean(-1, keepdim=True) + a["eps"])
    xhat = r_in * rstd
    dx = rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True))
    return [dx.flatten(-2) if group else dx]


def rmsnorm_bwd_weight(x: Tensors, a: dict, ctx: Any) -> Tensors:
    dy, inp = x
    group = a.get("group")
    xhat = rms_normalize(inp, a["eps"], group).to(inp.dtype).float()
    prod = dy.float() * xhat
    if group:
        prod = prod.unflatten(-1, (-1, group))
    return [prod.reshape(-1, prod.shape[-1]).sum(0)]


def rmsnorm_rope_bwd(x: Tensors, a: dict, ctx: Any) -> Tensors:
    """rmsnorm_bwd(rope_bwd(dout), x, w): by definition the two kernels it fuses (the rotated gradient in dout's
    dtype, as the pair's planned tensor holds it)."""
    dout, inp, w, *tables = x
    dnormed = rope_bwd([dout, *tables], a, ctx)[0].to(dout.dtype)
    return rmsnorm_bwd([dnormed, inp, w], a, ctx)


def linear_bwd_data(x: Tensors, a: dict, ctx: Any) -> Tensors:
    dy, w = x
    dt = common(dy, w)
    return [(dy.to(dt) @ w.to(dt)) * a.get("scale", 1.0)]


def linear_bwd_weight(x: Tensors, a: dict, ctx: Any) -> Tensors:
    dy, inp = x
    dt = common(dy, inp)
    dyr, xr = _rows(dy).to(dt), _rows(inp).to(dt)
    outs: Tensors = [(dyr.t() @ xr) * a.get("scale", 1.0)]
    if a.get("has_bias"):
        outs.append(dyr.sum(0))
    return outs


def rope_bwd(x: Tensors, a: dict, ctx: Any) -> Tensors:
    dy = x[0]
    b, t, w = dy.shape
    cos, sin = cos_sin(x, a, dy.dtype)
    d = dy.view(b, t, w // a["head_dim"], a["head_dim"])
    return [(d * cos + rotate_half_t(d * sin)).view(b, t, w)]


def attention_bwd(x: Tensors, a: dict, ctx: Any) -> Tensors:
    """Flash-style backward from the saved log-sum-exp, `chunks` blocks of query rows at a time."""
    do, q, k, v, out, lse, cu = x
    nh, nkv = a["num_heads"], a["num_kv_heads"]
    rep = nh // nkv
    qh = heads(q, nh).float()
    kh = heads(k, nkv).repeat_interleave(rep, dim=1).float()
    vh = heads(v, nkv).repeat_interleave(rep, dim=1).float()
    doh, oh = heads(do, nh).float(), heads(out, nh).float()
    t = q.shape[1]
    dq, dk, dv = torch.zeros_like(qh), torch.zeros_like(kh), torch.zeros_like(vh)
    step = -(-t // max(1, a.get("chunks", 1)))
    scores, _ = attention_probs(qh, kh, cu, a)
    for lo in range(0, t, step):
        hi = min(t, lo + step)
        p = torch.exp(scores[:, :, lo:hi] - lse[:, :, lo:hi, None])
        dv += p.transpose(-1, -2) @ doh[:, :, lo:hi]
        dp = doh[:, :, lo:hi] @ vh.transpose(-1, -2)
        delta = (doh[:, :, lo:hi] * oh[:, :, lo:hi]).sum(-1, keepdim=True)
        ds = p * (dp - delta) * a["scale"]
        dq[:, :, lo:hi] = ds @ kh
        dk += ds.transpose(-1, -2) @ qh[:, :, lo:hi]
    b = q.shape[0]
    dk = dk.view(b, nkv, rep, t, -1).sum(2)
    dv = dv.view(b, nkv, rep, t, -1).sum(2)
    grads = {0: merge_heads(dq), 1: merge_heads(dk), 2: merge_heads(dv)}
    return [*(grads[i] for i in a["wrt"]), None]


def swiglu_bwd(x: Tensors, a: dict, ctx: Any) -> Tensors:
    dy, g, u = x
    s = torch.sigmoid(g.float())
    silu = g.float() * s
    grads = {0: dy.float() * u.float() * s * (1 + g.float() * (1 - s)), 1: dy.float() * silu}
    return [grads[i] for i in a["wrt"]]


def dropout_bwd(x: Tensors, a: dict, ctx: Any) -> Tensors:
    return dropout(x, a, ctx)  # the same mask (seed, step) and factor applied to the output gradient


class _CEGrads:
    """dX / dW of the mean CE, accumulated chunk by chunk from each chunk's logits and log-sum-exp."""

    def __init__(self, ce: CEChunks, h: torch.Tensor, w: torch.Tensor, n_items: torch.Tensor, wrt: Any) -> None:
        self.ce, self.shape, self.wrt = ce, h.shape, wrt
        self.coef = 1.0 / n_items.float().clamp(min=1)
        self.dx = torch.zeros(ce.n, ce.rows.shape[1], dtype=torch.float32) if 0 in wrt else None
        self.dw = torch.zeros(w.shape, dtype=torch.float32) if 1 in wrt else None

    def add(self, logits: torch.Tensor, lo: int, hi: int, lse: torch.Tensor) -> None:
        ce = self.ce
        p = torch.exp(logits - lse[lo:hi, None])
        p[torch.arange(hi - lo), ce.lab[lo:hi].clamp(min=0)] -= 1.0
        p *= (ce.valid[lo:hi] * self.coef)[:, None]
        p = p.to(ce.rows.dtype)
        if self.dx is not None:
            self.dx[lo:hi] = (p @ ce.w).float()
        if self.dw is not None:
            self.dw += (p.t() @ ce.rows[lo:hi]).float()

    def outputs(self) -> Tensors:
        grads = {0: self.dx.view(self.shape) if self.dx is not None else None, 1: self.dw}
        return [grads[i] for i in self.wrt]


def lm_head_ce_bwd(x: Tensors, a: dict, ctx: Any) -> Tensors:
    """d(mean CE)/d(x, W), recomputing each chunk's logits from the saved log-sum-exp."""
    h, w, labels, lse, n_items, *weights = x
    ce = CEChunks(h, w, labels, a, *weights)
    grads = _CEGrads(ce, h, w, n_items, a["wrt"])
    for lo, hi, logits in ce:
        grads.add(logits, lo, hi, lse)
    return [*grads.outputs(), None]


def lm_head_ce_fwd_bwd(x: Tensors, a: dict, ctx: Any) -> Tensors:
    """lm_head_ce and lm_head_ce_bwd from one logits computation per chunk (pass fuse_lm_head_ce), with the pair's
    math: (loss, lse, *grads in `wrt` order, None)."""
    h, w, labels, n_items, *weights = x
    ce = CEChunks(h, w, labels, a, *weights)
    grads = _CEGrads(ce, h, w, n_items, a["wrt"])
    lse = torch.empty(ce.n, dtype=torch.float32)
    total = torch.zeros((), dtype=torch.float32)
    for lo, hi, logits in ce:
        total = total + ce.loss(logits, lo, hi, lse)
        grads.add(logits, lo, hi, lse)
    return [total / n_items.float().clamp(min=1), lse, *grads.outputs(), None]


KERNELS = {
    "embedding_bwd": embedding_bwd,
    "rmsnorm_bwd": rmsnorm_bwd,
    "rmsnorm_rope_bwd": rmsnorm_rope_bwd,
    "rmsnorm_bwd_weight": rmsnorm_bwd_weight,
    "linear_bwd_data": linear_bwd_data,
    "linear_bwd_weight": linear_bwd_weight,
    "rope_bwd": rope_bwd,
    "attention_bwd": attention_bwd,
    "swiglu_bwd": swiglu_bwd,
    "dropout_bwd": dropout_bwd,
    "lm_head_ce_bwd": lm_head_ce_bwd,
    "lm_head_ce_fwd_bwd": lm_head_ce_fwd_bwd,
}
