"""Small synthetic training graphs with known sizes, for testing the back-half passes in isolation.

The shape of the program mirrors the real builder + autodiff output: a residual stream (`attrs
["residual"]`), per-layer two-matmul blocks, a fused chunked LM head + cross-entropy at the start of
the backward pass, backward ops in reverse layer order writing GRADIENT tensors (`attrs["grad_of"]`).
With `recompute`, only the residual stream is saved and each layer's forward is re-run in backward.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from surogate.compiler.ir import Graph, Op, Role, Tensor

DEFAULTS: dict[str, Any] = dict(
    model="synthetic", gpus=1, zero_level=1, shard_weights=False, shard_gradients=False,
    distributed=SimpleNamespace(num_nodes=1, gpus_per_node=0, ray_address="auto", worker_output_dir=None),
    offload_residual=False, offload_master=False, offload_quants=False, offload_optimizer=False,
    offload_grads=False, persistent_quants=False, use_zero_copy=False, use_write_combined=False,
    optimizer="adamw_8bit", learning_rate=2e-4, weight_decay=0.1, max_grad_norm=0.0, master_dtype=None,
    adamw_beta1=0.9, adamw_beta2=0.999, adamw_epsilon=1e-8, normuon_momentum=0.95, normuon_beta2=0.95,
    normuon_cautious_wd=True, lr_scheduler_type="linear", recompute=False, lmhead_chunks=1,
)


def cfg(**changes: Any) -> SimpleNamespace:
    return SimpleNamespace(**{**DEFAULTS, **changes})


def build(
    layers: int = 3,
    batch: int = 2,
    seq: int = 16,
    hidden: int = 256,
    ffn: int = 512,
    vocab: int = 1024,
    recompute: bool = False,
    lmhead_chunks: int = 1,
    lora_rank: int = 0,
    qlora: bool = False,
) -> Graph:
    g = Graph()
    bt = batch * seq
    wrole = Role.FROZEN_WEIGHT if lora_rank else Role.TRAINABLE_WEIGHT

    def T(name, shape, dtype="bf16", role=Role.ACTIVATION, layer=None, **attrs):
        g.add_tensor(Tensor(name, tuple(shape), dtype, role, layer=layer, attrs=attrs))
        return name

    def W(name, shape, layer=None):
        g.add_tensor(Tensor(name, tuple(shape), "bf16", wrole, layer=layer, source=name))
        return name

    quant: dict[str, tuple[str, str]] = {}

    def Q(name, shape, layer):
        """QLoRA NF4 storage (0.5 byte/param + an fp32 absmax per 64) when `qlora`, else a plain weight."""
        if not qlora:
            return W(name, shape, layer)
        g.add_tensor(Tensor(name, tuple(shape), "nf4", Role.QUANT_WEIGHT, layer=layer, source=name))
        scale = T(f"{name}.absmax", (shape[0] * shape[1] // 64,), "fp32", Role.QUANT_SCALE, layer)
        quant[name] = (name, scale)
        return name

    deq_count = [0]

    def use(w, phase, layer):
        """The tensor an op reads for weight `w`: a fresh dequantized buffer for quantized storage."""
        if w not in quant:
            return w
        deq_count[0] += 1
        buf = T(f"{w}.deq{deq_count[0]}", g.tensors[w].shape, "bf16", Role.DEQUANT_BUFFER, layer)
        op(f"{w}.dequant{deq_count[0]}", "dequantize_nf4", list(quant[w]), [buf], phase, layer)
        return buf

    def op(name, kind, ins, outs, phase="forward", layer=None):
        g.add_op(Op(name, kind, ins, outs, {}, phase, layer))

    grads: dict[str, str] = {}

    def G(w, layer=None):
        t = g.tensors[w]
        if t.role is not Role.TRAINABLE_WEIGHT:
            return []
        if w in grads:  # accumulated by several ops (chunked LM head)
            return [grads[w]]
        grads[w] = T(f"grad.{w}", t.shape, t.dtype, Role.GRADIENT, layer, grad_of=w)
        return [grads[w]]

    ids = T("input_ids", (batch, seq), "int32", Role.INPUT)
    labels = T("labels", (batch, seq), "int32", Role.INPUT)
    emb = W("embed.weight", (vocab, hidden))
    x = T("embed.out", (bt, hidden), residual="layer_input")
    op("embed", "embedding", [ids, emb], [x])
    xs, ws = [x], []
    for i in range(layers):
        nw, w1, w2 = W(f"L{i}.norm.weight", (hidden,), i), Q(f"L{i}.w1", (hidden, ffn), i), Q(f"L{i}.w2", (ffn, hidden), i)
        lora = []
        if lora_rank:
            lora = [T(f"L{i}.w1.lora_A", (lora_rank, hidden), "fp32", Role.TRAINABLE_WEIGHT, i),
                    T(f"L{i}.w1.lora_B", (ffn, lora_rank), "fp32", Role.TRAINABLE_WEIGHT, i)]
        ws.append((nw, w1, w2, lora))
        n, h, a, y = (T(f"L{i}.{k}", (bt, d), layer=i) for k, d in (("norm", hidden), ("h", ffn), ("a", ffn), ("y", hidden)))
        out = T(f"L{i}.out", (bt, hidden), layer=i, residual="layer_input")
        op(f"L{i}.norm", "rmsnorm", [x, nw], [n], layer=i)
        op(f"L{i}.mm1", "matmul", [n, use(w1, "forward", i), *lora], [h], layer=i)
        op(f"L{i}.act", "gelu", [h], [a], layer=i)
        op(f"L{i}.mm2", "matmul", [a, use(w2, "forward", i)], [y], layer=i)
        op(f"L{i}.add", "add", [x, y], [out], layer=i)
        x = out
        xs.append(x)
    fw = W("final_norm.weight", (hidden,))
    xf = T("final.out", (bt, hidden))
    op("final_norm", "rmsnorm", [x, fw], [xf])
    head = W("lm_head.weight", (vocab, hidden))
    loss = T("loss", (), "fp32")
    # Backward: fused chunked LM head + CE, then layers in reverse.
    dxf = T("grad.final.out", (bt, hidden), role=Role.ACTIVATION_GRAD)
    rows = bt // lmhead_chunks
    for c in range(lmhead_chunks):
        logits = T(f"logits.{c}", (rows, vocab), "fp32", Role.TEMPORARY)
        dlogits = T(f"dlogits.{c}", (rows, vocab), "bf16", Role.TEMPORARY)
        op(f"lm_head.{c}", "matmul", [xf, head], [logits], "backward")
        op(f"ce.{c}", "cross_entropy", [logits, labels], [loss, dlogits], "backward")
        op(f"lm_head_bwd.{c}", "matmul_bwd", [dlogits, xf, head], [dxf, *G(head)], "backward")
    dx = T("grad.L.out", (bt, hidden), role=Role.ACTIVATION_GRAD, layer=layers - 1)
    op("final_norm_bwd", "rmsnorm_bwd", [dxf, x, fw], [dx, *G(fw)], "backward")
    for i in reversed(range(layers)):
        nw, w1, w2, lora = ws[i]
        xin = xs[i]
        if recompute:
            n, h, a = (T(f"L{i}.{k}.re", (bt, d), layer=i) for k, d in (("norm", hidden), ("h", ffn), ("a", ffn)))
            op(f"L{i}.norm.re", "rmsnorm", [xin, nw], [n], "backward", i)
            op(f"L{i}.mm1.re", "matmul", [n, use(w1, "backward", i), *lora], [h], "backward", i)
            op(f"L{i}.act.re", "gelu", [h], [a], "backward", i)
        else:
            n, h, a = f"L{i}.norm", f"L{i}.h", f"L{i}.a"
        da = T(f"L{i}.da", (bt, ffn), role=Role.ACTIVATION_GRAD, layer=i)
        dh = T(f"L{i}.dh", (bt, ffn), role=Role.ACTIVATION_GRAD, layer=i)
        dn = T(f"L{i}.dn", (bt, hidden), role=Role.ACTIVATION_GRAD, layer=i)
        dxi = T(f"L{i}.dx", (bt, hidden), role=Role.ACTIVATION_GRAD, layer=i)
        op(f"L{i}.mm2_bwd", "matmul_bwd", [dx, a, use(w2, "backward", i)], [da, *G(w2, i)], "backward", i)
        op(f"L{i}.act_bwd", "gelu_bwd", [da, h], [dh], "backward", i)
        lora_grads = []
        for t in lora:
            grads[t] = T(f"grad.{t}", g.tensors[t].shape, "fp32", Role.GRADIENT, i, grad_of=t)
            lora_grads.append(grads[t])
        op(f"L{i}.mm1_bwd", "matmul_bwd", [dh, n, use(w1, "backward", i), *lora], [dn, *G(w1, i), *lora_grads],
           "backward", i)
        op(f"L{i}.norm_bwd", "rmsnorm_bwd", [dn, xin, nw, dx], [dxi, *G(nw, i)], "backward", i)
        dx = dxi
    op("embed_bwd", "embedding_bwd", [dx, ids], G(emb), "backward")
    return g
