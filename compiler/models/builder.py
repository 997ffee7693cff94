"""Decoder-only graph builder shared by the families: embedding -> N x (attention block, MLP or MoE block)
-> final norm -> fused lm-head + cross-entropy. A family is a `ModelSpec` whose properties switch the
parts on (qkv bias for Qwen2, q/k RMSNorm for Qwen3, MoE blocks for Qwen3-MoE); see `families.py`.

Conventions downstream passes rely on:
- base weights are named (and `source`d) by their Hugging Face checkpoint names;
- activations are `L{layer}.{what}` with `layer=` set; the residual stream entering layer l is
  `embed.out` (l = 0) or `L{l-1}.out`, marked `attrs["residual"] = "layer_input"`; the mid-layer residual
  (input of the FFN block) is marked `"ffn_input"`;
- `labels` are pre-shifted: labels[b, t] is the target of position t (HF shifts inside the model, we
  expect the data pipeline to do it, so packed documents never predict across a boundary); -100 is ignored;
- `num_items` (fp32 scalar) is the loss denominator: the number of non-ignored labels the loss is averaged
  over. One micro-batch alone: its own count (loss = mean CE). Under gradient accumulation the runtime may
  pass the whole window's count, so that summed micro-step gradients equal HF Trainer's (`num_items_in_batch`);
- `cu_seqlens` (int32, B*T+1 entries, padded by repeating the total) bounds documents over the flattened
  B*T tokens; attention never crosses a boundary. One document per row is `[0, T, 2T, ..., B*T, ...]`.
- sequence parallelism (`sequence_parallel_size` sp > 1, models/sequence_parallel.py): the per-token inputs and
  activations hold this rank's T/sp tokens of each row; `cu_seqlens` and attention keep whole rows.
"""

from __future__ import annotations

from typing import Any

from surogate.compiler.ir import Graph, Op, Role, Tensor
from surogate.compiler.models.rope import inv_freq
from surogate.compiler.models.sequence_parallel import check_sequence_parallel, sharded_attention
from surogate.compiler.models.spec import ModelSpec
from surogate.compiler.ops import infer_shapes
from surogate.schema.loss_scale import is_custom


class GraphBuilder:
    """Small helper that creates tensors and ops with inferred shapes (linear in the number of ops)."""

    def __init__(self, graph: Graph, act_dtype: str, weight_role: Role, weight_dtype: str,
                 zero_projections: bool = False, router_stats: bool = False) -> None:
        self.zero_projections = zero_projections
        self.router_stats = router_stats
        self.stats: list[str] = []  # per-MoE-layer router statistics, when router losses are on
        self.g = graph
        self.act_dtype = act_dtype
        self.weight_role = weight_role
        self.weight_dtype = weight_dtype

    def weight(self, name: str, shape: tuple[int, ...], layer: int | None, **attrs: Any) -> str:
        attrs.setdefault("init", _init_rule(name, self.zero_projections))
        self.g.add_tensor(Tensor(name, shape, self.weight_dtype, self.weight_role, layer=layer, source=name,
                                 attrs=dict(attrs)))
        return name

    def input(self, name: str, shape: tuple[int, ...], dtype: str = "int32") -> str:
        self.g.add_tensor(Tensor(name, shape, dtype, Role.INPUT))
        return name

    def op(self, name: str, kind: str, inputs: list[str], outputs: list[str], layer: int | None,
           attrs: dict[str, Any] | None = None, dtypes: list[str] | None = None,
           roles: list[Role] | None = None) -> list[str]:
        attrs = attrs or {}
        shapes = infer_shapes(kind, [self.g.tensors[t].shape for t in inputs], attrs)
        for i, (out, shape) in enumerate(zip(outputs, shapes, strict=True)):
            dtype = dtypes[i] if dtypes else self.act_dtype
            role = roles[i] if roles else Role.ACTIVATION
            self.g.add_tensor(Tensor(out, tuple(shape), dtype, role, layer=layer))
        self.g.add_op(Op(name, kind, list(inputs), list(outputs), attrs, "forward", layer))
        return outputs


def router_loss_coefs(spec: ModelSpec, cfg: Any) -> tuple[float, float]:
    """(aux, z) router-loss coefficients. Unset options follow the model config, which (as in transformers)
    only applies its `router_aux_loss_coef` when `output_router_logits` is true."""
    if not spec.num_experts:
        return 0.0, 0.0
    on = bool(spec.hf_config.get("output_router_logits", False))
    aux = getattr(cfg, "router_aux_loss_coef", None)
    z = getattr(cfg, "router_z_loss_coef", None)
    if aux is None:
        aux = spec.hf_config.get("router_aux_loss_coef", 0.0) if on else 0.0
    if z is None:
        z = spec.hf_config.get("router_z_loss_coef", 0.0) if on else 0.0
    return float(aux or 0.0), float(z or 0.0)


def _init_rule(name: str, zero_projections: bool) -> str:
    """How a from-scratch run initialises a weight (transformers' `_init_weights`): norms to one, biases to
    zero, the rest normal(0, initializer_range); o_proj/down_proj zero with `init_projections_to_zero`."""
    if "norm" in name:
        return "ones"
    if name.endswith(".bias"):
        return "zeros"
    if zero_projections and ("o_proj" in name or "down_proj" in name):
        return "zeros"
    return "normal"


def build_decoder(spec: ModelSpec, cfg: Any) -> Graph:
    """The forward graph (one micro-batch) of a Llama/Qwen-style decoder."""
    b = int(getattr(cfg, "per_device_train_batch_size", 1) or 1)
    full_t = int(getattr(cfg, "sequence_len", 1024))
    lora = bool(getattr(cfg, "lora", True))
    from_scratch = bool(getattr(cfg, "from_scratch", False))
    trainable = from_scratch or not lora
    g = Graph()
    zero_proj = from_scratch and bool(getattr(cfg, "init_projections_to_zero", False))
    aux_coef, z_coef = router_loss_coefs(spec, cfg)
    sp = check_sequence_parallel(spec, cfg, full_t, router_losses=bool(aux_coef or z_coef))
    t = full_t // sp  # this rank's tokens of each row (sequence parallelism: its shard; sequence_parallel.py)
    bld = GraphBuilder(g, spec.dtype, Role.TRAINABLE_WEIGHT if trainable else Role.FROZEN_WEIGHT, spec.dtype,
                       zero_proj, router_stats=bool(aux_coef or z_coef))
    h, hd = spec.hidden_size, spec.head_dim
    freqs, att_scale = inv_freq(spec.hf_config, hd, full_t)

    ids = bld.input("input_ids", (b, t))
    labels = bld.input("labels", (b, t))
    pos = bld.input("position_ids", (b, t))
    cu = bld.input("cu_seqlens", (b * full_t + 1,))  # whole rows: attention sees them whole
    n_items = bld.input("num_items", (), "fp32")
    # a custom loss_scale weighs each target token (fp32, pre-shifted like the labels)
    weights = [bld.input("loss_weights", (b, t), "fp32")] if is_custom(getattr(cfg, "loss_scale", None)) else []

    emb_w = bld.weight("model.embed_tokens.weight", (spec.vocab_size, h), None)
    pad = spec.hf_config.get("pad_token_id")
    pad_attrs = {"padding_idx": int(pad)} if isinstance(pad, int) and 0 <= pad < spec.vocab_size else {}
    (x,) = bld.op("embed", "embedding", [ids, emb_w], ["embed.out"], None, pad_attrs)
    g.tensors[x].attrs["residual"] = "layer_input"
    if not getattr(cfg, "use_fused_rope", False):
        # Positions restart per document and stay below sequence_len: tables of full_t rows cover them all.
        g.meta["rope_tables"] = bld.op("rope_table", "rope_table", [], ["rope.cos", "rope.sin"], None,
                                       {"inv_freq": freqs, "attention_scaling": att_scale, "positions": full_t},
                                       dtypes=["fp32", "fp32"], roles=[Role.ACTIVATION, Role.ACTIVATION])
    for layer in range(spec.num_layers):
        x = _layer(bld, spec, layer, x, pos, cu, freqs, att_scale, sp)

    norm_w = bld.weight("model.norm.weight", (h,), None)
    (xn,) = bld.op("final_norm", "rmsnorm", [x, norm_w], ["final_norm.out"], None,
                   {"eps": spec.rms_norm_eps, "group": None})
    head_w = emb_w if spec.tie_word_embeddings else bld.weight("lm_head.weight", (spec.vocab_size, h), None)
    lm_loss = "lm_loss" if bld.stats else "loss"
    bld.op("lm_head", "lm_head_ce", [xn, head_w, labels, n_items, *weights], [lm_loss, "lm_head.lse", "lm_head.logits_ws"],
           None, {"chunks": 1, "ignore_index": -100},
           # the logits workspace holds the logits GEMM's output: the activation dtype (as HF's logits)
           dtypes=["fp32", "fp32", bld.act_dtype], roles=[Role.ACTIVATION, Role.ACTIVATION, Role.TEMPORARY])
    if bld.stats:
        (router,) = bld.op("router_loss", "moe_router_loss", bld.stats, ["router_loss"], None,
                           {"num_experts": spec.num_experts, "rows": b * t, "aux_coef": aux_coef, "z_coef": z_coef},
                           dtypes=["fp32"])
        bld.op("total_loss", "add", [lm_loss, router], ["loss"], None, dtypes=["fp32"])
        g.tensors[lm_loss].attrs["output"] = g.tensors[router].attrs["output"] = True
    g.tensors["loss"].attrs["output"] = True

    g.meta.update(
        spec=spec, family=spec.family, micro_batch=b, seq_len=t, attention_len=full_t, sequence_parallel=sp,
        num_layers=spec.num_layers, hidden_size=h,
        vocab_size=spec.vocab_size, model_dtype=spec.dtype, labels_shifted=True, loss="loss",
        inputs=[ids, labels, pos, cu, n_items], outputs=["loss", *(["lm_loss", "router_loss"] if bld.stats else [])],
        router_aux_loss_coef=aux_coef, router_z_loss_coef=z_coef, tied_embeddings=spec.tie_word_embeddings,
        full_finetune=trainable, lora=False, from_scratch=from_scratch,
        initializer_range=float(spec.hf_config.get("initializer_range", 0.02)),
    )
    if not spec.num_experts:  # said, not silent (the plan's notes reach `surogate plan` and the run's start)
        unused = [k for k in ("router_aux_loss_coef", "router_z_loss_coef") if getattr(cfg, k, None) is not None]
        if unused:
            g.meta.setdefault("notes", []).append(
                f"{', '.join(unused)}: this model has no MoE router; there is no router loss to weigh")
    return g


def _layer(bld: GraphBuilder, spec: ModelSpec, layer: int, x: str, pos: str, cu: str,
           freqs: list[float], att_scale: float, sp: int = 1) -> str:
    p, a = f"model.layers.{layer}", f"L{layer}"
    h, hd, nh, nkv = spec.hidden_size, spec.head_dim, spec.num_heads, spec.num_kv_heads
    eps = spec.rms_norm_eps
    w = bld.weight(f"{p}.input_layernorm.weight", (h,), layer)
    (xn,) = bld.op(f"{a}.attn_norm", "rmsnorm", [x, w], [f"{a}.attn_norm"], layer, {"eps": eps, "group": None})

    def proj(name: str, inp: str, out_f: int, in_f: int, bias: bool, part: str) -> str:
        wt = bld.weight(f"{p}.{part}.{name}.weight", (out_f, in_f), layer)
        ins = [inp, wt]
        if bias:
            ins.append(bld.weight(f"{p}.{part}.{name}.bias", (out_f,), layer))
        short = name.removesuffix("_proj")
        return bld.op(f"{a}.{short}", "linear", ins, [f"{a}.{short}"], layer, {"scale": 1.0, "module": name})[0]

    q = proj("q_proj", xn, nh * hd, h, spec.qkv_bias, "self_attn")
    k = proj("k_proj", xn, nkv * hd, h, spec.qkv_bias, "self_attn")
    v = proj("v_proj", xn, nkv * hd, h, spec.qkv_bias, "self_attn")
    if spec.qk_norm:
        qw = bld.weight(f"{p}.self_attn.q_norm.weight", (hd,), layer)
        kw = bld.weight(f"{p}.self_attn.k_norm.weight", (hd,), layer)
        (q,) = bld.op(f"{a}.q_norm", "rmsnorm", [q, qw], [f"{a}.q_norm"], layer, {"eps": eps, "group": hd})
        (k,) = bld.op(f"{a}.k_norm", "rmsnorm", [k, kw], [f"{a}.k_norm"], layer, {"eps": eps, "group": hd})
    rope = {"head_dim": hd, "inv_freq": freqs, "attention_scaling": att_scale}
    tables = list(bld.g.meta.get("rope_tables", ()))  # precomputed cos/sin unless use_fused_rope
    (q,) = bld.op(f"{a}.q_rope", "rope", [q, pos, *tables], [f"{a}.q_rope"], layer, rope)
    (k,) = bld.op(f"{a}.k_rope", "rope", [k, pos, *tables], [f"{a}.k_rope"], layer, rope)
    attn = {"num_heads": nh, "num_kv_heads": nkv, "head_dim": hd, "scale": hd**-0.5, "causal": True}
    if sp > 1:
        att = sharded_attention(bld, a, layer, q, k, v, cu, attn, sp, bld.act_dtype)
    else:
        att, _ = bld.op(f"{a}.attn", "attention", [q, k, v, cu], [f"{a}.attn", f"{a}.attn_lse"], layer, attn,
                        dtypes=[bld.act_dtype, "fp32"])
    o = proj("o_proj", att, h, nh * hd, spec.o_bias, "self_attn")
    (mid,) = bld.op(f"{a}.attn_res", "add", [x, o], [f"{a}.mid"], layer)
    bld.g.tensors[mid].attrs["residual"] = "ffn_input"
    w = bld.weight(f"{p}.post_attention_layernorm.weight", (h,), layer)
    (mn,) = bld.op(f"{a}.mlp_norm", "rmsnorm", [mid, w], [f"{a}.mlp_norm"], layer, {"eps": eps, "group": None})
    if spec.is_moe_layer(layer):
        mlp = _moe(bld, spec, layer, mn)
    else:
        i = spec.intermediate_size
        gate = proj("gate_proj", mn, i, h, spec.mlp_bias, "mlp")
        up = proj("up_proj", mn, i, h, spec.mlp_bias, "mlp")
        (act,) = bld.op(f"{a}.swiglu", "swiglu", [gate, up], [f"{a}.swiglu"], layer)
        mlp = proj("down_proj", act, h, i, spec.mlp_bias, "mlp")
    (out,) = bld.op(f"{a}.mlp_res", "add", [mid, mlp], [f"{a}.out"], layer)
    bld.g.tensors[out].attrs["residual"] = "layer_input"
    return out


def _moe(bld: GraphBuilder, spec: ModelSpec, layer: int, xn: str) -> str:
    p, a = f"model.layers.{layer}.mlp", f"L{layer}"
    e, k, h, mi = spec.num_experts, spec.experts_per_token, spec.hidden_size, spec.moe_intermediate_size
    rw = bld.weight(f"{p}.gate.weight", (e, h), layer, module="router")
    attrs = {"num_experts": e, "top_k": k, "norm_topk_prob": bool(spec.hf_config.get("norm_topk_prob", False))}
    _, weights, idx = bld.op(f"{a}.router", "moe_router", [xn, rw],
                             [f"{a}.router_logits", f"{a}.router_weights", f"{a}.router_indices"], layer, attrs,
                             dtypes=[bld.act_dtype, bld.act_dtype, "int32"])
    # Checkpoints store one tensor per expert; the graph holds them stacked (as transformers 5 does).
    gu = bld.weight(f"{p}.experts.gate_up_proj", (e, 2 * mi, h), layer, module="experts",
                    expert_sources=(f"{p}.experts.{{e}}.gate_proj.weight", f"{p}.experts.{{e}}.up_proj.weight"))
    dn = bld.weight(f"{p}.experts.down_proj", (e, h, mi), layer, module="experts",
                    expert_sources=(f"{p}.experts.{{e}}.down_proj.weight",))
    (out,) = bld.op(f"{a}.experts", "moe_experts", [xn, weights, idx, gu, dn], [f"{a}.moe"], layer,
                    {"num_experts": e, "top_k": k})
    if bld.router_stats:
        bld.stats += bld.op(f"{a}.router_stats", "moe_router_stats", [f"{a}.router_logits", idx],
                            [f"{a}.router_stats"], layer, {"num_experts": e}, dtypes=["fp32"])
    return out
