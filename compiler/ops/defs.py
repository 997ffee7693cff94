"""Declarations of every op kind (forward with shape + VJP rules, then backward kinds)."""

from __future__ import annotations

from typing import Any

from surogate.compiler.ops import OpDef, Shape, register
from surogate.compiler.ops import vjp as V


def _same(i: int = 0):
    return lambda s, a: [s[i]]


def _linear_shape(s: list[Shape], a: dict[str, Any]) -> list[Shape]:
    x, w = s[0], s[1]
    if x[-1] != w[1]:
        raise ValueError(f"linear: input features {x[-1]} != weight in_features {w[1]}")
    return [(*x[:-1], w[0])]


def _embedding_shape(s: list[Shape], a: dict[str, Any]) -> list[Shape]:
    return [(*s[0], s[1][1])]


def _attention_shape(s: list[Shape], a: dict[str, Any]) -> list[Shape]:
    b, t, _ = s[0]
    nh, nkv, hd = a["num_heads"], a["num_kv_heads"], a["head_dim"]
    if s[0][-1] != nh * hd or s[1][-1] != nkv * hd or s[2][-1] != nkv * hd or nh % nkv:
        raise ValueError("attention: q/k/v widths do not match num_heads/num_kv_heads/head_dim")
    return [(b, t, nh * hd), (b, nh, t)]


def _lm_head_ce_shape(s: list[Shape], a: dict[str, Any]) -> list[Shape]:
    rows = s[0][0] * s[0][1]
    chunks = a.get("chunks", 1)
    return [(), (rows,), (-(-rows // chunks), s[1][0])]


def _rope_table_shape(s: list[Shape], a: dict[str, Any]) -> list[Shape]:
    half = len(a["inv_freq"])
    return [(a["positions"], half), (a["positions"], half)]


def _seq_to_heads_shape(s: list[Shape], a: dict[str, Any]) -> list[Shape]:
    b, t, width = s[0]
    sp, heads, hd, rep = a["sp"], a["heads"], a["head_dim"], a.get("repeats", 1)
    if width != heads * hd or (heads * rep) % sp:
        raise ValueError(f"seq_to_heads: width {width} is not {heads} heads x {hd}, or {heads} x {rep} heads do not "
                         f"split {sp} ways")
    return [(b, t * sp, width * rep // sp)]


def _heads_to_seq_shape(s: list[Shape], a: dict[str, Any]) -> list[Shape]:
    b, t, width = s[0]
    sp, heads, hd, rep = a["sp"], a["heads"], a["head_dim"], a.get("repeats", 1)
    if width * sp != heads * rep * hd or (heads * rep) % sp or t % sp:
        raise ValueError(f"heads_to_seq: [{b}, {t}, {width}] is not {heads} x {rep} / {sp} heads x {hd} of a "
                         f"sequence that splits {sp} ways")
    return [(b, t // sp, heads * hd)]


def _swiglu_shape(s: list[Shape], a: dict[str, Any]) -> list[Shape]:
    if s[0] != s[1]:
        raise ValueError("swiglu: gate and up shapes differ")
    return [s[0]]


def _moe_router_shape(s: list[Shape], a: dict[str, Any]) -> list[Shape]:
    rows = s[0][0] * s[0][1]
    return [(rows, a["num_experts"]), (rows, a["top_k"]), (rows, a["top_k"])]


VARIADIC = tuple(range(4096))  # differentiable positions of ops taking one input per layer
register(OpDef("embedding", ("ids", "weight"), ("out",), ("padding_idx",), _embedding_shape, V.embedding, (1,),
               doc="out[b,t] = weight[ids[b,t]]; the padding_idx row gets no gradient (nn.Embedding)"))
register(OpDef("rmsnorm", ("x", "weight"), ("out",), ("eps", "group"), _same(), V.rmsnorm, (0, 1),
               doc="RMSNorm over groups of `group` features of the last dim (group = whole dim by default)"))
register(OpDef("linear", ("x", "weight", "bias?"), ("out",), ("scale",), _linear_shape, V.linear, (0, 1, 2),
               doc="out = scale * x @ weight.T (+ bias)"))
register(OpDef("rope", ("x", "position_ids", "cos?", "sin?"), ("out",), ("head_dim", "inv_freq", "attention_scaling"), _same(),
               V.rope, (0,), doc="rotate-half RoPE of each head (HF convention), cos/sin from inv_freq"))
register(OpDef("rope_table", (), ("cos", "sin"), ("inv_freq", "attention_scaling", "positions"), _rope_table_shape,
               None, (), doc="fp32 cos/sin tables [positions, head_dim/2] (use_fused_rope: false): rope reads them "
                             "instead of computing sin/cos on the fly"))
register(OpDef("attention", ("q", "k", "v", "cu_seqlens"), ("out", "lse"),
               ("num_heads", "num_kv_heads", "head_dim", "scale", "causal"), _attention_shape, V.attention,
               (0, 1, 2), doc="causal GQA softmax attention; tokens attend only inside their cu_seqlens document"))
register(OpDef("seq_to_heads", ("x",), ("out",), ("sp", "heads", "head_dim", "repeats"), _seq_to_heads_shape,
               V.seq_to_heads, (0,),
               doc="sequence parallelism (Ulysses): all-to-all in the sequence-parallel group from this rank's "
                   "token shard of every head [B, T/sp, heads*hd] to every token of its head shard "
                   "[B, T, heads*repeats/sp*hd] (shard i of the sequence from rank i, head shard j to rank j); "
                   "`repeats` > 1 sends each head `repeats` times (GQA key/value heads fewer than the group)"))
register(OpDef("heads_to_seq", ("x",), ("out",), ("sp", "heads", "head_dim", "repeats"), _heads_to_seq_shape,
               V.heads_to_seq, (0,),
               doc="the inverse all-to-all of seq_to_heads: [B, T, heads*repeats/sp*hd] -> [B, T/sp, heads*hd], "
                   "the `repeats` copies of each head summed (the gradient of the repeated send)"))
register(OpDef("swiglu", ("gate", "up"), ("out",), (), _swiglu_shape, V.swiglu, (0, 1), doc="silu(gate) * up"))
register(OpDef("add", ("a", "b"), ("out",), (), _same(), V.add, (0, 1), doc="residual add"))
register(OpDef("identity", ("x",), ("out",), (), _same(), V.identity, (0,), doc="copy"))
register(OpDef("dropout", ("x",), ("out",), ("p", "seed"), _same(), V.dropout, (0,),
               doc="inverted dropout; the mask is regenerated from (seed, step) so backward/recompute need no mask"))
register(OpDef("lm_head_ce", ("x", "weight", "labels", "num_items", "loss_weights?"), ("loss", "lse", "logits_ws"),
               ("chunks", "ignore_index"), _lm_head_ce_shape, V.lm_head_ce, (0, 1),
               doc="sum of cross-entropy of x @ weight.T against pre-shifted labels (times loss_weights per row, a "
                   "custom loss_scale) / num_items, in N row chunks (full logits never exist)"))
register(OpDef("moe_router", ("x", "weight"), ("logits", "weights", "indices"),
               ("num_experts", "top_k", "norm_topk_prob"), _moe_router_shape, V.moe_router, (0, 1),
               doc="router logits, top-k softmax weights (renormalised if norm_topk_prob) and expert indices"))
register(OpDef("moe_experts", ("x", "weights", "indices", "gate_up", "down", "scales*"), ("out", "dequant_ws?"),
               ("num_experts", "top_k"), _same(), V.moe_experts, (0, 1, 3, 4),
               doc="sum_k weights[k] * down_e(silu(gate_e x) * up_e x) over each token's top-k experts"))
register(OpDef("moe_router_stats", ("logits", "indices"), ("stats",), ("num_experts",),
               lambda s, a: [(2 * a["num_experts"] + 1,)], V.moe_router_stats, (0,),
               doc="per-layer router statistics: [expert counts | router probability sums | sum of lse^2]"))
register(OpDef("moe_router_loss", ("stats*",), ("loss",), ("num_experts", "rows", "aux_coef", "z_coef"),
               lambda s, a: [()], V.moe_router_loss, VARIADIC,
               doc="aux_coef * Switch load-balancing loss (as transformers) + z_coef * mean lse^2, over all layers"))
register(OpDef("dequant", ("q", "scale", "scale2?"), ("out",), ("format", "block_size", "shape", "double_quant"),
               None, None, (), cheap_recompute=True,
               doc="dequantize a stored (QLoRA) weight into a model-dtype buffer; redone in backward, never kept"))
register(OpDef("quantize", ("x", "amax_history?"), ("q", "scale", "scale2?", "mask?"),
               ("format", "update_history", "quartet"), None, None, (), doc="quantize a matmul input (fp8 delayed "
               "scaling from the amax history, updated in place unless update_history is False; fp4 block scaling; "
               "fp4_quartet: blockwise Hadamard, then NVFP4 with a global scale, plus the clip mask)"))
register(OpDef("qlinear", ("x", "weight", "x_q", "x_scale", "w_q", "w_scale", "bias?"), ("out",), ("format",),
               lambda s, a: _linear_shape([s[0], s[1]], a), V.qlinear, (0, 1, 6),
               doc="linear computed from quantized x and weight (fp8_hybrid / nvfp4 recipes); backward saves x_q only"))
register(OpDef("qlinear_quartet", ("x", "weight", "x_q", "x_scale", "x_gscale", "x_mask", "w_q", "w_scale", "w_gscale",
                                   "w_mask", "bias?"), ("out",), ("format", "quartet"),
               lambda s, a: _linear_shape([s[0], s[1]], a), V.qlinear_quartet, (0, 1, 10),
               doc="nvfp4_quartet linear: x and weight quantized in the same Hadamard basis (so the product is "
                   "x @ weight.T up to quantization error); backward: stochastic-rounded NVFP4 GEMMs after a "
                   "random-sign Hadamard along each GEMM's reduction dim, gradients masked by the clip masks"))

# Post-autodiff fusions: emitted after the backward program exists, so they need no VJP rule.
register(OpDef("lora_merge", ("base", "h", "b"), ("out",), ("scale",), _same(), None, (),
               doc="out = add(base, linear(h, b, scale)): a LoRA projection's merge without the [rows, out] "
                   "product tensor (pass fuse_lora_merge); the product is rounded to h/b's dtype, then to base's"))
register(OpDef("lora_fold_tail", ("b",), ("tail",), ("scale", "slot", "slots"),
               lambda s, a: [(s[0][0], s[0][1] * a["slots"])], None, (),
               doc="tail = [0 .. scale * b .. 0]: the r columns of slot `slot` of a folded projection's [W | tail] "
                   "weight hold scale * b, the other slots zeros (pass fold_lora_up_projection)"))
for kind, ins, outs, doc in (
    ("linear_stacked", ("x", "weights*"), ("out",), "out = x @ [W_1; ...; W_n]^T, the n products side by side "
     "(pass group_lora_projections: LoRA down-projections sharing x; the weights adjacent in the arena)"),
    ("linear_stacked_bwd_data", ("dout", "weights*"), ("dx",), "dx = dout @ [W_1; ...; W_n], dout holding the n "
     "output gradients side by side (one GEMM with K = the summed rows)"),
    ("linear_stacked_bwd_weight", ("dout", "x"), ("dweights*",), "[dW_1; ...; dW_n] = dout^T @ x, one GEMM into "
     "the adjacent gradients"),
):
    register(OpDef(kind, ins, outs, ("scale", "lora", "stacked", "accumulate_into"), doc=doc))
register(OpDef("rmsnorm_rope", ("x", "weight", "position_ids", "cos", "sin"), ("out",),
               ("eps", "group", "head_dim", "inv_freq", "attention_scaling"), _same(), None, (),
               doc="out = rope(rmsnorm(x, weight)) per head: a q/k norm with its rotation (pass fuse_rmsnorm_rope), "
                   "the normalised value rounded to x's dtype in between, exactly the pair's"))
register(OpDef("add_rmsnorm", ("a", "b", "weight"), ("out", "sum"), ("eps", "group"), lambda s, a: [s[0], s[0]], None,
               (), doc="sum = add(a, b); out = rmsnorm(sum, weight): the residual add fused into the norm that reads "
                       "it (pass fuse_add_rmsnorm); both outputs exactly the pair's"))

# Backward kinds. `accumulate_into` (op attr) lists outputs added into rather than overwritten.
for kind, ins, outs in (
    ("embedding_bwd", ("dout", "ids"), ("dweight",)),
    ("rmsnorm_bwd", ("dout", "x", "weight"), ("dx",)),
    ("rmsnorm_bwd_weight", ("dout", "x"), ("dweight",)),
    ("linear_bwd_data", ("dout", "weight"), ("dx",)),
    ("linear_bwd_weight", ("dout", "x"), ("dweight", "dbias?")),
    ("rope_bwd", ("dout", "position_ids", "cos?", "sin?"), ("dx",)),
    ("attention_bwd", ("dout", "q", "k", "v", "out", "lse", "cu_seqlens"), ("dq", "dk", "dv", "workspace")),
    ("swiglu_bwd", ("dout", "gate", "up"), ("dgate?", "dup?")),
    ("dropout_bwd", ("dout",), ("dx",)),
    ("qlinear_bwd_data", ("dout", "w_q", "w_scale"), ("dx",)),
    ("qlinear_bwd_weight", ("dout", "x_q", "x_scale"), ("dweight", "dbias?")),
    ("qlinear_quartet_bwd_data", ("dout", "w_q", "w_scale", "w_gscale", "x_mask"), ("dx",)),
    ("qlinear_quartet_bwd_weight", ("dout", "x_q", "x_scale", "x_gscale", "w_mask"), ("dweight", "dbias?")),
    ("lm_head_ce_bwd", ("x", "weight", "labels", "lse", "num_items", "loss_weights?"), ("dx?", "dweight?", "logits_ws")),
    ("moe_router_bwd", ("dweights", "x", "weight", "logits", "indices", "dlogits?"), ("dx?", "dweight?")),
    ("moe_router_stats_bwd", ("dstats", "logits"), ("dlogits",)),
    ("moe_router_loss_bwd", ("stats*",), ("dstats*",)),
    ("moe_experts_bwd", ("dout", "x", "weights", "indices", "gate_up", "down"),
     ("dx?", "dweights?", "dgate_up?", "ddown?", "dequant_ws?")),
):
    register(OpDef(kind, ins, outs, ("wrt", "accumulate", "accumulate_into"), doc=f"backward of {kind[:-4]}"))
register(OpDef("lm_head_ce_fwd_bwd", ("x", "weight", "labels", "num_items", "loss_weights?"), ("loss", "lse", "dx?", "dweight?", "logits_ws"),
               ("chunks", "ignore_index", "wrt", "accumulate", "accumulate_into"),
               doc="lm_head_ce and its backward in one sweep (pass fuse_lm_head_ce): each row chunk's logits are "
                   "computed once and turned into their gradient in place; every output exactly the pair's"))
register(OpDef("rmsnorm_rope_bwd", ("dout", "x", "weight", "position_ids", "cos", "sin"), ("dx",),
               ("wrt", "accumulate", "accumulate_into", "eps", "group", "head_dim", "inv_freq", "attention_scaling"),
               doc="rmsnorm_bwd(rope_bwd(dout), x, weight): a q/k norm's backward with the inverse rotation of its "
                   "output gradient (pass fuse_rmsnorm_rope); the rotated gradient rounded as the pair stores it"))
