"""Precision pass: dtypes, master weights, QLoRA storage (sizes and numerics), quantized-matmul recipes."""

from __future__ import annotations

import pytest
import torch

from surogate.compiler.ir import Role
from surogate.errors import UserError
from surogate.runtime.reference import load_weights
from surogate.runtime.reference.quant import dequantize, quantize
from tests.compiler_front.helpers import compile_front, make_cfg, random_batch, rel_err, run_ours, save_tiny

QWEN = "Qwen/Qwen3-0.6B"
N_QUANT = 28 * (1024 * (2048 + 1024 + 1024 + 3 * 3072) + 2048 * 1024)  # decoder projections of Qwen3-0.6B


def _sum(graph, role, attr="nbytes"):
    return sum(getattr(t, attr) for t in graph.tensors.values() if t.role == role)


def _qlora(**over):
    return compile_front(make_cfg(QWEN, lora=True, sequence_len=16, **over), backward=False)


def test_qlora_nf4_storage_is_half_a_byte_per_param_plus_scales():
    g = _qlora(qlora_bnb=True, qlora_bnb_double_quant=False)
    assert _sum(g, Role.QUANT_WEIGHT, "numel") == N_QUANT
    assert _sum(g, Role.QUANT_WEIGHT) == N_QUANT // 2
    assert _sum(g, Role.QUANT_SCALE) == 4 * N_QUANT // 64  # one fp32 absmax per 64
    dq = _qlora(qlora_bnb=True)  # double quant: int8 absmax + an fp32 per 256 of them
    assert _sum(dq, Role.QUANT_WEIGHT) == N_QUANT // 2
    assert _sum(dq, Role.QUANT_SCALE) < _sum(g, Role.QUANT_SCALE) / 3
    assert (_sum(dq, Role.QUANT_WEIGHT) + _sum(dq, Role.QUANT_SCALE)) / N_QUANT == pytest.approx(0.516, abs=1e-3)
    # embedding (tied lm_head) and norms stay bf16
    assert _sum(g, Role.FROZEN_WEIGHT, "numel") == 596_049_920 - N_QUANT
    assert g.tensors["model.embed_tokens.weight"].dtype == "bf16"


def test_qlora_fp8_and_fp4_storage():
    fp8 = _qlora(qlora_fp8=True, qlora_block_size=128)
    assert _sum(fp8, Role.QUANT_WEIGHT) == N_QUANT
    assert {t.dtype for t in fp8.tensors.values() if t.role == Role.QUANT_WEIGHT} == {"fp8_e4m3"}
    assert fp8.tensors["model.layers.0.mlp.down_proj.weight.scale"].shape == (8, 24)
    fp4 = _qlora(qlora_fp4=True)
    assert _sum(fp4, Role.QUANT_WEIGHT) == N_QUANT // 2
    assert {t.dtype for t in fp4.tensors.values() if t.role == Role.QUANT_WEIGHT} == {"fp4_e2m1"}


def test_skip_quant_layers_and_dequant_wiring():
    g = compile_front(make_cfg(QWEN, lora=True, sequence_len=16, qlora_bnb=True, skip_quant_first_layers=2,
                               skip_quant_last_layers=1))
    g.check()
    quant_layers = {t.layer for t in g.tensors.values() if t.role == Role.QUANT_WEIGHT}
    assert quant_layers == set(range(2, 27))
    assert g.tensors["model.layers.0.self_attn.q_proj.weight"].role == Role.FROZEN_WEIGHT
    assert "model.layers.5.self_attn.q_proj.weight" not in g.tensors
    q = g.tensors["model.layers.5.self_attn.q_proj.weight.q"]
    assert q.source == "model.layers.5.self_attn.q_proj.weight"
    deq = "model.layers.5.self_attn.q_proj.weight.deq"
    assert g.tensors[deq].role == Role.DEQUANT_BUFFER
    order = list(g.order)
    assert order.index("model.layers.5.self_attn.q_proj.weight.dequant") == order.index("L5.q") - 1
    # the dequant buffer is never kept for backward: backward re-dequantizes
    assert all(g.op(c).phase == "forward" for c in g.consumers(deq))
    redo = [op for op in g.ops() if op.kind == "dequant" and op.phase == "backward" and op.layer == 5]
    assert len(redo) == 7


@pytest.mark.parametrize("bad,match", [
    (dict(qlora_bnb=True, qlora_fp8=True), "only one QLoRA"),
    (dict(qlora_bnb=True, lora=False), "needs lora"),
    (dict(recipe="fp16x"), "recipe"),
])
def test_precision_option_errors(bad, match):
    with pytest.raises(UserError, match=match):
        compile_front(make_cfg(QWEN, **{"lora": True, "sequence_len": 8, **bad}), backward=False)


def test_master_weights_and_gradient_dtype():
    full = compile_front(make_cfg(QWEN, lora=False, sequence_len=8, master_dtype="fp32", gradient_dtype="fp32"))
    masters = [t for t in full.tensors.values() if t.role == Role.MASTER_WEIGHT]
    assert len(masters) == len([t for t in full.tensors.values() if t.role == Role.TRAINABLE_WEIGHT])
    assert {t.dtype for t in masters} == {"fp32"} and _sum(full, Role.MASTER_WEIGHT) == 4 * 596_049_920
    assert {t.dtype for t in full.tensors.values() if t.role == Role.ACTIVATION_GRAD} == {"fp32"}
    assert {t.dtype for t in full.tensors.values() if t.role == Role.GRADIENT} == {"bf16"}
    lora = compile_front(make_cfg(QWEN, lora=True, sequence_len=8, master_dtype="fp32"))
    assert _sum(lora, Role.MASTER_WEIGHT) == 0  # fp32 adapters are their own master copy
    assert {t.dtype for t in lora.tensors.values() if t.role == Role.GRADIENT} == {"fp32"}


def test_fp8_hybrid_quantizes_matmul_inputs_with_amax_history():
    g = compile_front(make_cfg(QWEN, lora=False, sequence_len=16, recipe="fp8_hybrid", fp8_amax_history=8,
                               skip_quant_first_layers=1))
    g.check()
    hist = [t for t in g.tensors.values() if t.attrs.get("amax_history")]
    # per layer: inputs attn_norm, attn, mlp_norm, swiglu + seven weights
    assert len(hist) == 27 * (4 + 7) and {t.shape for t in hist} == {(8 + 1,)}  # the window + 1 (kernels_quant)
    assert not any(op.kind == "qlinear" and op.layer == 0 for op in g.ops())
    assert g.tensors["L3.q.x_q"].dtype == "fp8_e4m3" and g.tensors["L3.q.x_q"].role == Role.ACTIVATION
    assert g.tensors["L3.attn_norm"].role == Role.TEMPORARY  # only its fp8 copy is saved
    assert g.op("lm_head").kind == "lm_head_ce"  # the LM head is never quantized
    bwd = [op for op in g.ops() if op.kind in ("qlinear_bwd_data", "qlinear_bwd_weight")]
    assert bwd and {op.attrs["grad_format"] for op in bwd} == {"fp8_e5m2"}  # E4M3 forward, E5M2 backward


def _prequantized_model(tmp_path, fmt, block):
    """A tiny model whose projections are already exactly representable in `fmt`."""
    from safetensors.torch import load_file, save_file

    d = save_tiny(tmp_path, "qwen3", hidden_size=128, intermediate_size=256)
    path = d / "model.safetensors"
    state = load_file(path)
    for k, v in state.items():
        if ".layers." in k and k.endswith("proj.weight"):
            state[k] = dequantize(fmt, quantize(fmt, v, block), tuple(v.shape), block).contiguous()
    save_file(state, path, metadata={"format": "pt"})
    return d


@pytest.mark.parametrize("flag,fmt,block", [("qlora_bnb", "nf4", 64), ("qlora_fp8", "fp8_block", 64)])
def test_qlora_on_representable_weights_equals_lora(tmp_path, flag, fmt, block):
    """Quantization is lossless on such weights, so QLoRA must reproduce LoRA's loss and gradients exactly:
    this checks the dequant placement (forward and re-dequant in backward), not the quantizer."""
    d = _prequantized_model(tmp_path, fmt, block)
    ids, labels = random_batch(101, 2, 16)
    results = []
    for q in (False, True):
        cfg = make_cfg(d, lora=True, recompute=q, qlora_bnb_double_quant=False, qlora_block_size=block,
                       qlora_bnb_block_size=block, **{flag: q})
        graph = compile_front(cfg)
        w = load_weights(graph, d, lora_seed=4)
        for k in [k for k in w if k.endswith("lora_B.weight")]:
            w[k] = torch.randn(w[k].shape, generator=torch.Generator().manual_seed(len(k))) * 0.1
        results.append(run_ours(graph, d, ids, labels, weights=w))
    (l0, g0), (l1, g1) = results
    assert l1 == pytest.approx(l0, rel=1e-5)
    assert set(g0) == set(g1) and all(rel_err(g1[k], g0[k]) < 1e-5 for k in g0)


@pytest.mark.parametrize("fmt,block,bound", [("nf4", 64, 0.11), ("fp8_block", 128, 0.035), ("fp4", 16, 0.12),
                                             ("fp4_block", 16, 0.12), ("fp8_tensor", 1, 0.035)])
def test_reference_quantizers_error_bounds(fmt, block, bound):
    w = torch.randn(256, 192, generator=torch.Generator().manual_seed(0)) * 0.02
    parts = quantize(fmt, w, block)
    err = rel_err(dequantize(fmt, parts, tuple(w.shape), block), w)
    assert 0 < err < bound


def test_nf4_double_quant_roundtrip_close_to_single():
    w = torch.randn(512, 128, generator=torch.Generator().manual_seed(1))
    single = dequantize("nf4", quantize("nf4", w, 64), tuple(w.shape), 64)
    double = dequantize("nf4", quantize("nf4", w, 64, True), tuple(w.shape), 64, True)
    assert rel_err(double, single) < 0.01


@pytest.mark.parametrize("recipe", ["fp8_hybrid", "nvfp4"])
def test_quantized_recipes_run_close_to_bf16_reference(tmp_path, recipe):
    d = save_tiny(tmp_path, "llama")
    ids, labels = random_batch(101, 2, 16)
    losses = []
    for r in ("bf16", recipe):
        graph = compile_front(make_cfg(d, recipe=r, recompute=True))
        loss, grads = run_ours(graph, d, ids, labels)
        assert set(grads) == {n for n, t in graph.tensors.items() if t.role == Role.TRAINABLE_WEIGHT}
        losses.append(loss)
    assert losses[1] != losses[0] and losses[1] == pytest.approx(losses[0], rel=0.02)


def test_fp8_gradient_dtype_is_the_backward_matmul_format(tmp_path):
    """gradient_dtype fp8_e4m3 with fp8_hybrid: dY is rounded through E4M3 (not the default E5M2) in both backward
    GEMMs of each fp8 projection; activation gradients stay in the model dtype (unscaled fp8 would underflow)."""
    d = save_tiny(tmp_path, "llama")
    ids, labels = random_batch(101, 2, 16)
    _, exact = run_ours(compile_front(make_cfg(d)), d, ids, labels)
    runs = {}
    for grad in (None, "fp8_e4m3"):
        graph = compile_front(make_cfg(d, recipe="fp8_hybrid", gradient_dtype=grad))
        formats = {op.attrs["grad_format"] for op in graph.ops() if op.kind.startswith("qlinear_bwd")}
        assert formats == {grad or "fp8_e5m2"}
        assert {t.dtype for t in graph.tensors.values() if t.role == Role.ACTIVATION_GRAD} == {"fp32"}  # model's
        runs[grad] = run_ours(graph, d, ids, labels)
    (l0, g0), (l1, g1) = runs[None], runs["fp8_e4m3"]
    assert l1 == l0  # the forward is the same
    assert [n for n in g0 if not torch.equal(g0[n], g1[n])]
    # one mantissa bit more: E4M3's gradients are the closer to the unquantized recipe's
    err = {grad: sum(rel_err(g[n], exact[n]) for n in exact) for grad, (_, g) in runs.items()}
    assert err["fp8_e4m3"] < err[None], err


def test_selective_expert_dequant_drops_the_full_expert_buffer():
    def graph(selective):
        return compile_front(make_cfg("Qwen/Qwen3-30B-A3B", lora=True, qlora_bnb=True, sequence_len=64,
                                      per_device_train_batch_size=1, recompute=True,
                                      qlora_selective_expert_dequant=selective))

    full, sel = graph(False), graph(True)
    sel.check()
    stack = "model.layers.3.mlp.experts.gate_up_proj"
    assert f"{stack}.deq" in full.tensors and f"{stack}.deq" not in sel.tensors
    experts = sel.op("L3.experts")
    assert f"{stack}.q" in experts.inputs and experts.attrs["quant"]["format"] == "nf4"
    assert sel.tensors[experts.outputs[1]].shape == (3 * 768 * 2048,)  # one expert's gate, up and down
    ws = sel.tensors[experts.outputs[1]]
    assert ws.role == Role.DEQUANT_BUFFER and ws.nbytes * 128 == (full.tensors[f"{stack}.deq"].nbytes
                                                                  + full.tensors["model.layers.3.mlp.experts.down_proj.deq"].nbytes)
    assert not any(op.kind == "dequant" and "experts" in op.name for op in sel.ops())


def test_selective_expert_dequant_numerics_equal_full_dequant(tmp_path):
    d = save_tiny(tmp_path, "qwen3_moe")
    ids, labels = random_batch(101, 2, 16)
    results = []
    for selective in (False, True):
        graph = compile_front(make_cfg(d, lora=True, qlora_fp8=True, qlora_block_size=64, recompute=selective,
                                       qlora_selective_expert_dequant=selective))
        w = load_weights(graph, d, lora_seed=4)
        for k in [k for k in w if k.endswith("lora_B.weight")]:
            w[k] = torch.randn(w[k].shape, generator=torch.Generator().manual_seed(len(k))) * 0.1
        results.append(run_ours(graph, d, ids, labels, weights=w))
    (l0, g0), (l1, g1) = results
    assert l1 == pytest.approx(l0, rel=1e-6)
    assert all(rel_err(g1[k], g0[k]) < 1e-5 for k in g0)


def test_fp8_amax_history_advances_once_per_step_with_recompute(tmp_path):
    d = save_tiny(tmp_path, "qwen3")
    graph = compile_front(make_cfg(d, recipe="fp8_hybrid", recompute=True, fp8_amax_history=4))
    assert any(op.kind == "quantize" and op.attrs.get("recompute") for op in graph.ops())
    values = load_weights(graph, d)
    ids, labels = random_batch(101, 2, 16)
    from surogate.runtime.reference import batch_inputs, run_graph
    from tests.compiler_front.helpers import shift_labels

    for step in range(2):
        values.update(batch_inputs(graph, ids, shift_labels(labels)))
        run_graph(graph, values, step=step)
    hists = [values[n] for n, t in graph.tensors.items() if t.attrs.get("amax_history")]
    assert hists and all(int((h != 0).sum()) == 2 for h in hists)  # two steps, two entries, not four


def test_expert_options_on_a_dense_model_say_they_do_nothing():
    from surogate.compiler.pipeline import compile_plan

    plan = compile_plan(make_cfg("Qwen/Qwen3-0.6B", lora=True, qlora_bnb=True, sequence_len=64,
                                 per_device_train_batch_size=1, qlora_selective_expert_dequant=True,
                                 qlora_offload_experts=True))
    notes = plan.meta["notes"]
    assert any(n.startswith("qlora_selective_expert_dequant: the model has no MoE experts") for n in notes)
    assert any(n.startswith("qlora_offload_experts: no quantized MoE expert weights") for n in notes)
    moe = compile_front(make_cfg("Qwen/Qwen3-30B-A3B", lora=True, qlora_bnb=True, sequence_len=64,
                                 per_device_train_batch_size=1, qlora_selective_expert_dequant=True))
    assert not any("qlora_selective" in n for n in moe.meta.get("notes", []))
