"""MoE kernels of the CPU reference backend: top-k router and SwiGLU experts (forward and backward),
following transformers' Qwen3-MoE (softmax in fp32, top-k, optional renormalisation)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from surogate.runtime.reference.quant import dequantize

Tensors = list[torch.Tensor | None]


def moe_router(x: Tensors, a: dict, ctx: Any) -> Tensors:
    h, w = x
    logits = h.reshape(-1, h.shape[-1]) @ w.to(h.dtype).t()
    probs = torch.softmax(logits.float(), dim=-1)
    top, idx = torch.topk(probs, a["top_k"], dim=-1)
    if a.get("norm_topk_prob"):
        top = top / top.sum(-1, keepdim=True)
    return [logits, top.to(logits.dtype), idx.to(torch.int32)]


def _tokens_of(idx: torch.Tensor, e: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(token rows, top-k slot) routed to expert e."""
    return torch.where(idx.long() == e)


def _expert_weights(x: Tensors, a: dict, shift: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The stacked expert weights, dequantized when the op reads quantized stacks (selective dequant).

    The reference dequantizes the whole stack at once (same numbers); a GPU kernel does it per routed expert."""
    w = {3: x[3 + shift], 4: x[4 + shift]}
    quant = a.get("quant")
    if quant:
        for pos, *scales in quant["inputs"]:
            q = x[pos + shift]
            w[pos] = dequantize(quant["format"], [q, *(x[s + shift] for s in scales)], tuple(q.shape),
                                quant["block_size"], quant["double_quant"])
    return w[3], w[4]


def moe_experts(x: Tensors, a: dict, ctx: Any) -> Tensors:
    h, weights, idx = x[:3]
    gate_up, down = _expert_weights(x, a, 0)
    rows = h.reshape(-1, h.shape[-1])
    out = torch.zeros_like(rows)
    for e in range(a["num_experts"]):
        tok, slot = _tokens_of(idx, e)
        if tok.numel() == 0:
            continue
        g, u = (rows[tok] @ gate_up[e].to(rows.dtype).t()).chunk(2, dim=-1)
        y = (F.silu(g) * u) @ down[e].to(rows.dtype).t()
        out.index_add_(0, tok, y * weights[tok, slot, None].to(rows.dtype))
    return [out.view(h.shape), None]


def moe_experts_bwd(x: Tensors, a: dict, ctx: Any) -> Tensors:
    dout, h, weights, idx = x[:4]
    gate_up, down = _expert_weights(x, a, 1)
    rows = h.reshape(-1, h.shape[-1]).float()
    dy_all = dout.reshape(-1, dout.shape[-1]).float()
    dx = torch.zeros_like(rows)
    dw = torch.zeros(weights.shape, dtype=torch.float32)
    dgu = torch.zeros(gate_up.shape, dtype=torch.float32)
    dd = torch.zeros(down.shape, dtype=torch.float32)
    for e in range(a["num_experts"]):
        tok, slot = _tokens_of(idx, e)
        if tok.numel() == 0:
            continue
        hx, gu_w, d_w = rows[tok], gate_up[e].float(), down[e].float()
        g, u = (hx @ gu_w.t()).chunk(2, dim=-1)
        s = torch.sigmoid(g)
        act = g * s * u
        y = act @ d_w.t()
        dy = dy_all[tok]
        dw[tok, slot] = (dy * y).sum(-1)
        dyw = dy * weights[tok, slot, None].float()
        dd[e] += dyw.t() @ act
        da = dyw @ d_w
        dg = da * u * s * (1 + g * (1 - s))
        dgate_up = torch.cat([dg, da * g * s], dim=-1)
        dgu[e] += dgate_up.t() @ hx
        dx.index_add_(0, tok, dgate_up @ gu_w)
    grads = {0: dx.view(h.shape), 1: dw, 3: dgu, 4: dd}
    return [grads[i] for i in a["wrt"]] + [None]


def moe_router_bwd(x: Tensors, a: dict, ctx: Any) -> Tensors:
    dweights, h, w, logits, idx = x[:5]
    probs = torch.softmax(logits.float(), dim=-1)
    idx = idx.long()
    top = probs.gather(1, idx)
    dw = dweights.float()
    if a.get("norm_topk_prob"):
        total = top.sum(-1, keepdim=True)
        normed = top / total
        dtop = (dw - (dw * normed).sum(-1, keepdim=True)) / total
    else:
        dtop = dw
    dprobs = torch.zeros_like(probs).scatter_(1, idx, dtop)
    dlogits = probs * (dprobs - (dprobs * probs).sum(-1, keepdim=True))
    if len(x) > 5:
        dlogits = dlogits + x[5].float()
    rows = h.reshape(-1, h.shape[-1]).float()
    grads = {0: (dlogits @ w.float()).view(h.shape), 1: dlogits.t() @ rows}
    return [grads[i] for i in a["wrt"]]


def moe_router_stats(x: Tensors, a: dict, ctx: Any) -> Tensors:
    logits, idx = x
    e = a["num_experts"]
    counts = torch.bincount(idx.reshape(-1).long(), minlength=e).float()
    probsum = torch.softmax(logits.float(), dim=-1).sum(0)
    zsum = torch.logsumexp(logits.float(), dim=-1).pow(2).sum()
    return [torch.cat([counts, probsum, zsum[None]])]


def moe_router_stats_bwd(x: Tensors, a: dict, ctx: Any) -> Tensors:
    dstats, logits = x
    e = a["num_experts"]
    lf = logits.float()
    p = torch.softmax(lf, dim=-1)
    g = dstats[e:2 * e].float()
    dlogits = p * (g - (p * g).sum(-1, keepdim=True))
    dlogits += dstats[2 * e].float() * 2 * torch.logsumexp(lf, dim=-1, keepdim=True) * p
    return [dlogits]


def _totals(stats: Tensors, a: dict) -> tuple[torch.Tensor, torch.Tensor, float]:
    e = a["num_experts"]
    total = torch.stack([s.float() for s in stats]).sum(0)
    return total[:e], total[e:2 * e], float(a["rows"] * len(stats))


def moe_router_loss(x: Tensors, a: dict, ctx: Any) -> Tensors:
    """transformers' load_balancing_loss_func (layers concatenated) and the ST-MoE z-loss."""
    counts, probs, rows = _totals(x, a)
    aux = a["num_experts"] * (counts / rows * probs / rows).sum()
    z = torch.stack([s[2 * a["num_experts"]].float() for s in x]).sum() / rows
    return [a["aux_coef"] * aux + a["z_coef"] * z]


def moe_router_loss_bwd(x: Tensors, a: dict, ctx: Any) -> Tensors:
    e = a["num_experts"]
    counts, _, rows = _totals(x, a)
    d = torch.zeros(2 * e + 1)
    d[e:2 * e] = a["aux_coef"] * e * counts / rows**2  # expert counts are not differentiable
    d[2 * e] = a["z_coef"] / rows
    return [d.clone() for _ in a["wrt"]]


KERNELS = {"moe_router_stats": moe_router_stats, "moe_router_stats_bwd": moe_router_stats_bwd,
           "moe_router_loss": moe_router_loss, "moe_router_loss_bwd": moe_router_loss_bwd,
           "moe_router": moe_router, "moe_experts": moe_experts, "moe_experts_bwd": moe_experts_bwd,
           "moe_router_bwd": moe_router_bwd}
