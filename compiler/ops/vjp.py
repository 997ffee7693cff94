"""VJP rules: for each differentiable forward op, the backward ops autodiff emits.

Each rule receives a `VJPContext` (see `surogate.compiler.passes.autodiff`) and uses only:
`ctx.op` (the forward op), `ctx.needs(i)` (input i wants a gradient), `ctx.dout(j)` (gradient tensor
of output j), `ctx.din(i)` -> (gradient tensor of input i, accumulate?), `ctx.saved(t)` (read a forward
tensor from backward; returns the name to read), `ctx.temp(tag, shape, dtype)` (workspace),
`ctx.alias_grad(i, j)` (let input i's gradient *be* output j's, when safe) and `ctx.emit(...)`.
Weight gradients always accumulate (`din` says so), so the graph is one micro-step of accumulation.
"""

from __future__ import annotations

from typing import Any


def _grads(ctx: Any, positions: tuple[int, ...]) -> tuple[list[int], list[str], list[str]]:
    """(wrt positions, gradient outputs, outputs to accumulate into) for the inputs that need gradients."""
    wrt, outs, acc = [], [], []
    for i in positions:
        if ctx.needs(i):
            name, accumulate = ctx.din(i)
            wrt.append(i)
            outs.append(name)
            if accumulate:
                acc.append(name)
    return wrt, outs, acc


def embedding(ctx: Any) -> None:
    _, outs, acc = _grads(ctx, (1,))
    if outs:
        attrs = {"padding_idx": ctx.op.attrs.get("padding_idx")}
        ctx.emit("embedding_bwd", [ctx.dout(0), ctx.saved(ctx.op.inputs[0])], outs, attrs, acc)


def rmsnorm(ctx: Any) -> None:
    x, w = ctx.op.inputs
    attrs = {"eps": ctx.op.attrs["eps"], "group": ctx.op.attrs.get("group")}
    _, outs, acc = _grads(ctx, (0,))
    if outs:
        ctx.emit("rmsnorm_bwd", [ctx.dout(0), ctx.saved(x), ctx.saved(w)], outs, attrs, acc)
    _, outs, acc = _grads(ctx, (1,))
    if outs:
        ctx.emit("rmsnorm_bwd_weight", [ctx.dout(0), ctx.saved(x)], outs, attrs, acc)


def linear(ctx: Any) -> None:
    x, w = ctx.op.inputs[:2]
    # (`dropout_scale`: the forward's factor in training programs, which the backward belongs to)
    scale = ctx.op.attrs.get("scale", 1.0) * ctx.op.attrs.get("dropout_scale", 1.0)
    _, outs, acc = _grads(ctx, (0,))
    if outs:
        ctx.emit("linear_bwd_data", [ctx.dout(0), ctx.saved(w)], outs, {"scale": scale}, acc)
    positions = (1, 2) if len(ctx.op.inputs) > 2 else (1,)
    wrt, outs, acc = _grads(ctx, positions)
    if outs:
        ctx.emit("linear_bwd_weight", [ctx.dout(0), ctx.saved(x)], outs,
                 {"scale": scale, "has_bias": 2 in wrt}, acc)


def qlinear(ctx: Any) -> None:
    """Like `linear`, but backward reads the quantized copies (fp8 x_q is what stays saved)."""
    _, _, xq, xs, wq, ws = ctx.op.inputs[:6]
    fmt = ctx.op.attrs.get("format")
    # fp8_hybrid: E4M3 forward, E5M2 (wider range, or gradient_dtype's fp8 format) for the output gradient in both
    # backward matmuls (compiler/passes/precision.py)
    grad_fmt = ctx.op.attrs.get("grad_format", "fp8_e5m2") if fmt == "fp8_tensor" else None
    _, outs, acc = _grads(ctx, (0,))
    if outs:
        ctx.emit("qlinear_bwd_data", [ctx.dout(0), ctx.saved(wq), ctx.saved(ws)], outs,
                 {"format": fmt, "grad_format": grad_fmt}, acc)
    wrt, outs, acc = _grads(ctx, (1, 6) if len(ctx.op.inputs) > 6 else (1,))
    if outs:
        ctx.emit("qlinear_bwd_weight", [ctx.dout(0), ctx.saved(xq), ctx.saved(xs)], outs,
                 {"format": fmt, "grad_format": grad_fmt, "has_bias": 6 in wrt}, acc)


def qlinear_quartet(ctx: Any) -> None:
    """Quartet backward: both GEMMs read the saved Hadamard-domain NVFP4 copies (x_q for dW, w_q for dx), the
    output gradient is re-quantized with stochastic rounding inside the kernels, and each result is masked by
    the other operand's clip mask before the inverse Hadamard (QuEST's trust estimator)."""
    _, _, xq, xs, xg, xm, wq, ws, wg, wm = ctx.op.inputs[:10]
    attrs = {"format": ctx.op.attrs.get("format"), "quartet": dict(ctx.op.attrs["quartet"])}
    _, outs, acc = _grads(ctx, (0,))
    if outs:
        ctx.emit("qlinear_quartet_bwd_data", [ctx.dout(0), *(ctx.saved(t) for t in (wq, ws, wg, xm))], outs,
                 {**attrs, "stream": 0}, acc)
    wrt, outs, acc = _grads(ctx, (1, 10) if len(ctx.op.inputs) > 10 else (1,))
    if outs:
        ctx.emit("qlinear_quartet_bwd_weight", [ctx.dout(0), *(ctx.saved(t) for t in (xq, xs, xg, wm))], outs,
                 {**attrs, "stream": 1, "has_bias": 10 in wrt}, acc)


def rope(ctx: Any) -> None:
    _, outs, acc = _grads(ctx, (0,))
    if outs:
        attrs = {k: ctx.op.attrs[k] for k in ("head_dim", "inv_freq", "attention_scaling")}
        tables = [ctx.saved(t) for t in ctx.op.inputs[2:]]  # cos/sin tables, when not fused
        ctx.emit("rope_bwd", [ctx.dout(0), ctx.saved(ctx.op.inputs[1]), *tables], outs, attrs, acc)


def attention(ctx: Any) -> None:
    wrt, outs, acc = _grads(ctx, (0, 1, 2))
    if not outs:
        return
    q, k, v, cu = ctx.op.inputs
    out, lse = ctx.op.outputs
    attrs = dict(ctx.op.attrs)
    attrs.setdefault("chunks", 1)
    ws = ctx.temp("attn_ws", workspace_shape_attention(ctx.shape(q), attrs), "fp32")
    ctx.emit("attention_bwd", [ctx.dout(0), *(ctx.saved(t) for t in (q, k, v, out, lse, cu))], [*outs, ws],
             {**attrs, "wrt": tuple(wrt)}, acc)


def workspace_shape_attention(q_shape: tuple[int, ...], attrs: dict[str, Any]) -> tuple[int, ...]:
    """fp32 dQ accumulator for one chunk of query rows: [B, ceil(T / chunks), heads * head_dim]."""
    b, t, width = q_shape
    return (b, -(-t // max(1, attrs.get("chunks", 1))), width)


def swiglu(ctx: Any) -> None:
    wrt, outs, acc = _grads(ctx, (0, 1))
    if outs:
        g, u = ctx.op.inputs
        ctx.emit("swiglu_bwd", [ctx.dout(0), ctx.saved(g), ctx.saved(u)], outs, {"wrt": tuple(wrt)}, acc)


def add(ctx: Any) -> None:
    for i in (0, 1):
        if ctx.needs(i) and not ctx.alias_grad(i, 0):
            name, accumulate = ctx.din(i)
            ctx.emit("identity", [ctx.dout(0)], [name], {}, [name] if accumulate else [])


def identity(ctx: Any) -> None:
    if ctx.needs(0) and not ctx.alias_grad(0, 0):
        name, accumulate = ctx.din(0)
        ctx.emit("identity", [ctx.dout(0)], [name], {}, [name] if accumulate else [])


def seq_to_heads(ctx: Any) -> None:
    """The gradient of an all-to-all is the inverse all-to-all of the output gradient."""
    _all_to_all_vjp(ctx, "heads_to_seq")


def heads_to_seq(ctx: Any) -> None:
    _all_to_all_vjp(ctx, "seq_to_heads")


def _all_to_all_vjp(ctx: Any, inverse: str) -> None:
    _, outs, acc = _grads(ctx, (0,))
    if outs:
        attrs = {k: ctx.op.attrs[k] for k in ("sp", "heads", "head_dim", "repeats") if k in ctx.op.attrs}
        ctx.emit(inverse, [ctx.dout(0)], outs, attrs, acc)


def dropout(ctx: Any) -> None:
    _, outs, acc = _grads(ctx, (0,))
    if outs:
        attrs = {k: ctx.op.attrs[k] for k in ("p", "seed", "scaled") if k in ctx.op.attrs}
        ctx.emit("dropout_bwd", [ctx.dout(0)], outs, attrs, acc)


def lm_head_ce(ctx: Any) -> None:
    wrt, outs, acc = _grads(ctx, (0, 1))
    if not outs:
        return
    x, w, labels, n_items, *weights = ctx.op.inputs
    _, lse, ws_fwd = ctx.op.outputs
    attrs = {k: ctx.op.attrs.get(k) for k in ("chunks", "ignore_index")}
    ws = ctx.temp("logits_ws", ctx.shape(ws_fwd), ctx.dtype(ws_fwd))
    ins = [ctx.saved(x), ctx.saved(w), ctx.saved(labels), ctx.saved(lse), ctx.saved(n_items),
           *(ctx.saved(t) for t in weights)]
    ctx.emit("lm_head_ce_bwd", ins, [*outs, ws],
             {**attrs, "wrt": tuple(wrt)}, acc)


def moe_router(ctx: Any) -> None:
    if ctx.dout(1) is None:
        return
    wrt, outs, acc = _grads(ctx, (0, 1))
    if outs:
        x, w = ctx.op.inputs
        logits, _, indices = ctx.op.outputs
        ins = [ctx.dout(1), ctx.saved(x), ctx.saved(w), ctx.saved(logits), ctx.saved(indices)]
        if ctx.dout(0) is not None:  # router losses also differentiate the logits
            ins.append(ctx.dout(0))
        ctx.emit("moe_router_bwd", ins, outs, {**ctx.op.attrs, "wrt": tuple(wrt)}, acc)


def moe_router_stats(ctx: Any) -> None:
    _, outs, acc = _grads(ctx, (0,))
    if outs:
        ctx.emit("moe_router_stats_bwd", [ctx.dout(0), ctx.saved(ctx.op.inputs[0])], outs, dict(ctx.op.attrs), acc)


def moe_router_loss(ctx: Any) -> None:
    wrt, outs, acc = _grads(ctx, tuple(range(len(ctx.op.inputs))))
    if outs:
        ctx.emit("moe_router_loss_bwd", [ctx.saved(t) for t in ctx.op.inputs], outs,
                 {**ctx.op.attrs, "wrt": tuple(wrt)}, acc)


def moe_experts(ctx: Any) -> None:
    wrt, outs, acc = _grads(ctx, (0, 1, 3, 4))
    if outs:
        ins = [ctx.dout(0), *(ctx.saved(t) for t in ctx.op.inputs)]
        if len(ctx.op.outputs) > 1:  # fused selective dequant: backward needs its own one-expert workspace
            ws = ctx.op.outputs[1]
            outs = [*outs, ctx.temp("dequant_ws", ctx.shape(ws), ctx.dtype(ws), role="dequant_buffer")]
        ctx.emit("moe_experts_bwd", ins, outs, {**ctx.op.attrs, "wrt": tuple(wrt)}, acc)
