"""The reference implementations behind the CUDA launchers' signatures (backend `cpu`).

Each function takes exactly the arguments of the launcher of the same name and writes the same output
buffers, computing with the module's torch reference; the runtime can therefore call either through
`KERNELS[name].reference` / `.cuda` without knowing which it got.
"""

from __future__ import annotations

import torch

from . import adamw8bit, cross_entropy, dropout, fp8, lut_dequant, nf4, normuon, quant8, rmsnorm, rope, swiglu


def rmsnorm_forward(x, weight, out, rstd, eps, residual=None, sum_out=None) -> None:
    o, r, s = rmsnorm.rmsnorm_forward_ref(x, weight, eps, residual)
    out.copy_(o)
    rstd.copy_(r)
    if s is not None:
        sum_out.copy_(s)


def rmsnorm_rope_forward(x, weight, out, rstd, eps, position_ids, cos, sin) -> None:
    out.copy_(rmsnorm.rmsnorm_rope_ref(x, weight, eps, position_ids, cos, sin))
    rstd.copy_(rmsnorm.rstd_ref(x, eps).reshape(-1))


def rmsnorm_rope_backward(dout, x, weight, dx, dweight, workspace, eps, position_ids, cos, sin) -> None:
    d, dw = rmsnorm.rmsnorm_rope_backward_ref(dout, x, weight, eps, position_ids, cos, sin)
    dx.copy_(d)
    if dweight is not None:
        dweight.copy_(dw)


def rmsnorm_backward(dy, s, weight, rstd, ds, dweight, dresidual=None, workspace=None, eps=None) -> None:
    if rstd is None:  # as the launcher: recomputed from s (the forward's definition)
        rstd = rmsnorm.rstd_ref(s, eps).reshape(-1)
    d, dw = rmsnorm.rmsnorm_backward_ref(dy, s, weight, rstd, dresidual)
    ds.copy_(d)
    if dweight is not None:
        dweight.copy_(dw)


def swiglu_forward(gate, up, out) -> None:
    out.copy_(swiglu.swiglu_forward_ref(gate, up))


def swiglu_backward(dout, gate, up, dgate, dup) -> None:
    dg, du = swiglu.swiglu_backward_ref(dout, gate, up)
    dgate.copy_(dg)
    dup.copy_(du)


def rope_forward(x, out, position_ids, cos, sin) -> None:
    out.copy_(rope.rope_forward_ref(x, position_ids, cos, sin).to(out.dtype))


def rope_backward(dout, dx, position_ids, cos, sin) -> None:
    dx.copy_(rope.rope_forward_ref(dout, position_ids, cos, sin, backward=True).to(dx.dtype))


def rope_fused_forward(x, out, position_ids, inv_freq, attention_scaling=1.0) -> None:
    out.copy_(rope.rope_fused_ref(x, position_ids, inv_freq, attention_scaling).to(out.dtype))


def rope_fused_backward(dout, dx, position_ids, inv_freq, attention_scaling=1.0) -> None:
    dx.copy_(rope.rope_fused_ref(dout, position_ids, inv_freq, attention_scaling, backward=True).to(dx.dtype))


def dropout_apply(x, out, p, seed, offset=0, step=None, scale=None, token_shard=(0, 1)) -> None:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    if step is not None:
        offset = int(offset) + int(step.reshape(-1)[0]) * x.numel() * token_shard[1]
    out.copy_(dropout.dropout_ref(x, p, seed, offset, scale, token_shard).to(out.dtype))


def _chunks(n: int, ws) -> list[tuple[int, int]]:
    step = max(1, ws.rows_per_chunk if ws is not None else n)
    return [(r0, min(n, r0 + step)) for r0 in range(0, n, step)]


def lmhead_ce_forward(x, w, labels, lse, loss_rows, ws, ignore_index=cross_entropy.IGNORE_INDEX):
    # row chunks of the workspace: the CPU path also never holds more than one chunk of logits
    for r0, r1 in _chunks(x.shape[0], ws):
        logits = (x[r0:r1] @ w.t()).float()
        lab = labels[r0:r1]
        valid = lab != ignore_index
        safe = torch.where(valid, lab, torch.zeros_like(lab)).long()
        l_ = torch.logsumexp(logits, dim=-1)
        lse[r0:r1] = l_
        loss_rows[r0:r1] = torch.where(valid, l_ - logits.gather(1, safe[:, None])[:, 0], torch.zeros_like(l_))
    return loss_rows.sum(), (labels != ignore_index).sum()


def lmhead_ce_backward(x, w, labels, lse, grad_scale, dx, dw, ws, ignore_index=cross_entropy.IGNORE_INDEX):
    for r0, r1 in _chunks(x.shape[0], ws):
        _, _, gx, gw = cross_entropy.lmhead_ce_ref(x[r0:r1], w, labels[r0:r1], grad_scale, ignore_index)
        dx[r0:r1] = gx
        if dw is not None:
            dw.add_(gw)


def lmhead_ce_forward_backward(
    x, w, labels, grad_scale, lse, loss_rows, dx, dw, ws, ignore_index=cross_entropy.IGNORE_INDEX
):
    out = lmhead_ce_forward(x, w, labels, lse, loss_rows, ws, ignore_index)
    lmhead_ce_backward(x, w, labels, lse, grad_scale, dx, dw, ws, ignore_index)
    return out


def quantize_blockwise(x, qmap, codes, absmax, block=256, offset=None) -> None:
    c, a = quant8.quantize_blockwise_ref(x, qmap, block, 0.0 if offset is None else offset)
    codes.view(-1).copy_(c)
    absmax.copy_(a)


def dequantize_blockwise(codes, absmax, qmap, out, block=256, offset=None) -> None:
    v = quant8.dequantize_blockwise_ref(codes, absmax, qmap, block, 0.0 if offset is None else offset)
    out.view(-1).copy_(v.to(out.dtype))


def nf4_quantize(x, packed, absmax, block=64, levels_mids=None) -> None:
    q = nf4.nf4_quantize_ref(x, block)
    packed.copy_(q.packed)
    absmax.copy_(q.absmax)


def nf4_double_quant(absmax, qabsmax, absmax2, offset, qmap=None) -> None:
    torch.mean(absmax, dim=0, keepdim=True, out=offset)
    quantize_blockwise(absmax, quant8.dynamic_map(True) if qmap is None else qmap, qabsmax, absmax2, 256, offset)


def nf4_dequantize(packed, out, block=64, absmax=None, qabsmax=None, absmax2=None, offset=None, levels=None,
                   qmap=None) -> None:
    if absmax is None and (qabsmax is None or absmax2 is None or offset is None):
        raise ValueError("nf4_dequantize needs absmax, or qabsmax + absmax2 + offset (double quantization)")
    q = nf4.NF4Tensor(packed, absmax, qabsmax, absmax2, offset, block, tuple(out.shape))
    out.copy_(nf4.nf4_dequantize_ref(q, out.dtype))


def lut_dequantize(codes, table, scale, block, out, s2=None, offset=None, group=256) -> None:
    out.copy_(lut_dequant.lut_dequantize_ref(codes, table, scale, block, s2, offset, group).view(out.shape))


def fp8_amax(x, amax) -> None:
    amax.copy_(x.float().abs().max().reshape(1))


def fp8_quantize(x, codes, scale, fmt="e4m3", divide=False) -> None:
    codes.copy_(fp8.fp8_quantize_ref(x, scale, fmt, divide))


fp8_delayed_scale = fp8.fp8_delayed_scale_ref


def fp8_dequantize(codes, scale_inv, out, fmt="e4m3") -> None:
    out.copy_(fp8.fp8_dequantize_ref(codes, scale_inv, fmt, out.dtype))


def fp8_quantize_blocks(x, codes, scale_inv, block, fmt="e4m3") -> None:
    c, s = fp8.fp8_quantize_blocks_ref(x, block, fmt)
    codes.copy_(c)
    scale_inv.copy_(s)


def fp8_dequantize_blocks(codes, scale_inv, out, block, fmt="e4m3") -> None:
    out.copy_(fp8.fp8_dequantize_blocks_ref(codes, scale_inv, block, fmt, out.dtype))


adamw8bit_step = adamw8bit.adamw8bit_step_ref


def normuon_momentum(grad, momentum, update, beta, nesterov=True) -> None:
    m, u = normuon.normuon_momentum_ref(grad, momentum, beta, nesterov)
    momentum.copy_(m)
    update.copy_(u)


def normuon_normalise(o, v, rowsq, scale, beta2) -> None:
    of = o.float()
    _, v_new = normuon.normuon_normalise_ref(of, v, beta2)
    rowsq.copy_((of * of).sum(-1))
    v.copy_(v_new)
    rows, cols = of.shape
    base = of / (v_new.sqrt()[:, None] + normuon.EPS)
    scale.copy_((of.norm() / (base.norm() + normuon.EPS) * max(1.0, rows / cols) ** 0.5).reshape(1))


def normuon_apply(param, o, v, scale, hp, cautious=True, grad=None, momentum=None) -> None:
    d = o.float() / (v.float().sqrt()[:, None] + normuon.EPS) * scale.float()
    param.copy_(normuon.normuon_apply_ref(param, d, float(hp[0]), float(hp[1]), cautious, grad, momentum))
