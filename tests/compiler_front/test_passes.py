"""Structure of the front-half passes: LoRA, autodiff, recompute, chunking (on preset graphs, no weights)."""

from __future__ import annotations

import pytest

from surogate.compiler.ir import Role
from surogate.compiler.models import build_forward_graph, resolve_model
from surogate.compiler.passes.autodiff import emit_backward
from surogate.compiler.passes.lora import inject_lora, lora_targets
from surogate.errors import UserError
from tests.compiler_front.helpers import compile_front, make_cfg

QWEN = "Qwen/Qwen3-0.6B"


def _bytes(graph, role):
    return sum(t.nbytes for t in graph.tensors.values() if t.role == role)


def _lora_a(layers: int = 28) -> set[str]:
    """The LoRA down-projections (x @ A^T) of every layer: recompute keeps them (compiler/passes/recompute.py)."""
    return {f"L{i}.{p}.lora_a" for i in range(layers) for p in ("q", "k", "v", "o", "gate", "up", "down")}


def test_lora_targets_and_scale():
    cfg = make_cfg(QWEN, lora=True, lora_rank=8, lora_alpha=32, lora_target_modules=("q_proj", "v"), sequence_len=8)
    graph = inject_lora(build_forward_graph(resolve_model(cfg), cfg), cfg)
    adapters = {t.attrs["base"] for t in graph.tensors.values() if "lora" in t.attrs}
    assert adapters == {f"model.layers.{i}.self_attn.{p}.weight" for i in range(28) for p in ("q_proj", "v_proj")}
    ups = [op for op in graph.ops() if op.attrs.get("lora") == "B"]
    assert len(ups) == 56 and all(op.attrs["scale"] == 4.0 for op in ups)
    assert graph.tensors["model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (8, 1024)
    assert graph.tensors["model.layers.0.self_attn.q_proj.lora_B.weight"].shape == (2048, 8)
    # consumers of the projection output now read the LoRA-merged tensor
    assert graph.op("L0.q_norm").inputs[0] == "L0.q" and graph.producers("L0.q") == ["L0.q.lora_add"]
    graph.check()


def test_lora_targets_validation():
    assert lora_targets(("all",)) == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    with pytest.raises(UserError, match="lora_target_modules"):
        lora_targets(("qkv",))


@pytest.mark.parametrize("over", [dict(lora=False), dict(lora=True, from_scratch=True)])
def test_full_finetune_makes_base_weights_trainable(over):
    cfg = make_cfg(QWEN, sequence_len=8, **over)
    graph = inject_lora(build_forward_graph(resolve_model(cfg), cfg), cfg)
    assert _bytes(graph, Role.FROZEN_WEIGHT) == 0
    assert not any("lora" in t.attrs for t in graph.tensors.values())
    assert sum(t.numel for t in graph.tensors.values() if t.role == Role.TRAINABLE_WEIGHT) == 596_049_920


def test_lora_dropout_and_dtype():
    cfg = make_cfg(QWEN, lora=True, lora_dropout=0.1, lora_dtype="bf16", sequence_len=8)
    graph = inject_lora(build_forward_graph(resolve_model(cfg), cfg), cfg)
    drops = [op for op in graph.ops() if op.kind == "dropout"]
    assert len(drops) == 28 * 7 and len({op.attrs["seed"] for op in drops}) == len(drops)
    assert {t.dtype for t in graph.tensors.values() if "lora" in t.attrs} == {"bf16"}


def test_train_router_makes_moe_router_trainable():
    cfg = make_cfg("Qwen/Qwen3-30B-A3B", lora=True, train_router=True, sequence_len=8, per_device_train_batch_size=1)
    graph = inject_lora(build_forward_graph(resolve_model(cfg), cfg), cfg)
    assert graph.tensors["model.layers.0.mlp.gate.weight"].role == Role.TRAINABLE_WEIGHT
    assert graph.tensors["model.layers.0.mlp.experts.gate_up_proj"].role == Role.FROZEN_WEIGHT
    assert not [n for n in graph.meta.get("notes", []) if n.startswith("train_router")]
    dense = make_cfg(QWEN, lora=True, train_router=True, sequence_len=8)
    notes = inject_lora(build_forward_graph(resolve_model(dense), dense), dense).meta.get("notes", [])
    assert "train_router: this model has no MoE router; nothing more is trained" in notes


def test_all_targets_on_a_moe_model_say_the_experts_get_no_adapters():
    cfg = make_cfg("Qwen/Qwen3-30B-A3B", lora=True, sequence_len=8, per_device_train_batch_size=1)
    graph = inject_lora(build_forward_graph(resolve_model(cfg), cfg), cfg)
    note, = [n for n in graph.meta.get("notes", []) if n.startswith("lora_target_modules:")]
    assert "MoE experts get no adapters" in note and "(0 in this model)" in note
    assert {t.attrs["base"].split(".")[-2] for t in graph.tensors.values() if t.attrs.get("lora") == "A"} == \
        {"q_proj", "k_proj", "v_proj", "o_proj"}
    dense = make_cfg(QWEN, lora=True, sequence_len=8)  # a dense model: nothing to say
    assert not [n for n in inject_lora(build_forward_graph(resolve_model(dense), dense), dense).meta.get("notes", [])
                if n.startswith("lora_target_modules:")]


def test_frozen_weights_get_no_gradients_and_no_dead_backward_work():
    cfg = make_cfg(QWEN, lora=True, sequence_len=8)
    graph = compile_front(cfg)
    graph.check()
    grads = [t for t in graph.tensors.values() if t.role == Role.GRADIENT]
    assert {t.attrs["grad_of"] for t in grads} == {n for n, t in graph.tensors.items() if "lora" in t.attrs}
    kinds = {op.kind for op in graph.ops() if op.phase == "backward"}
    # nothing feeds the frozen embedding / norms: no embedding or norm-weight backward at all
    assert "embedding_bwd" not in kinds and "rmsnorm_bwd_weight" not in kinds
    for op in graph.ops():
        if op.phase == "backward":
            for o in op.outputs:
                if graph.tensors[o].role == Role.GRADIENT:
                    assert op.attrs["accumulate"] and o in op.attrs["accumulate_into"]


def test_backward_skips_layers_that_cannot_reach_a_trainable_weight():
    """LoRA on o_proj only: layer 0's q/k/v come from frozen ops on the (frozen) embedding, so layer 0 has no
    attention backward, while layer 1's attention input depends on layer 0's adapter."""
    cfg = make_cfg(QWEN, lora=True, lora_target_modules=("o_proj",), sequence_len=8)
    graph = compile_front(cfg)
    att_bwd = {op.layer for op in graph.ops() if op.kind == "attention_bwd"}
    assert 0 not in att_bwd and 1 in att_bwd


def test_full_finetune_gradients_cover_every_weight_once():
    cfg = make_cfg("meta-llama/Llama-3.2-1B", sequence_len=8, per_device_train_batch_size=1)
    graph = compile_front(cfg)
    weights = {n for n, t in graph.tensors.items() if t.role == Role.TRAINABLE_WEIGHT}
    assert set(graph.meta["grads"]) == weights
    # tied embedding: one gradient, written by the lm-head backward and accumulated by the embedding backward
    g = graph.meta["grads"]["model.embed_tokens.weight"]
    writers = [graph.op(w).kind for w in graph.producers(g)]
    assert sorted(writers) == ["embedding_bwd", "lm_head_ce_bwd"]


def test_saved_vs_temporary_roles_after_autodiff():
    cfg = make_cfg(QWEN, sequence_len=8)
    graph = compile_front(cfg)
    for t in graph.tensors.values():
        if t.role == Role.ACTIVATION:
            assert any(graph.op(c).phase == "backward" for c in graph.consumers(t.name)) or t.attrs.get("output")
    assert graph.tensors["L3.swiglu"].role == Role.ACTIVATION  # read by down_proj's weight gradient
    assert graph.tensors["lm_head.logits_ws"].role == Role.TEMPORARY


@pytest.mark.parametrize("lora", [False, True])
def test_recompute_lowers_activation_bytes_and_keeps_layer_inputs(lora):
    base = compile_front(make_cfg(QWEN, lora=lora, recompute=False, sequence_len=64))
    rc = compile_front(make_cfg(QWEN, lora=lora, recompute=True, sequence_len=64))
    rc.check()
    assert _bytes(rc, Role.ACTIVATION) < 0.25 * _bytes(base, Role.ACTIVATION)
    saved_layer = {t.name for t in rc.tensors.values() if t.role == Role.ACTIVATION and t.layer is not None}
    assert rc.tensors["embed.out"].role == Role.ACTIVATION  # layer 0's recompute starts from it
    # layer outputs = next inputs (last: final norm); LoRA's [tokens, rank] down-projections
    assert saved_layer == {f"L{i}.out" for i in range(28)} | (_lora_a() if lora else set())
    assert not any(op.attrs.get("lora") == "A" for op in rc.ops() if op.attrs.get("recompute"))
    first_bwd: dict[int, int] = {}
    for i, op in enumerate(rc.ops()):
        if op.phase == "backward" and op.layer is not None and not op.attrs.get("recompute"):
            first_bwd.setdefault(op.layer, i)
    for i, op in enumerate(rc.ops()):
        if op.attrs.get("recompute"):
            assert op.phase == "backward" and i < first_bwd[op.layer]
    for graph in (base, rc):  # whatever backward reads from the forward pass is a saved activation
        for op in graph.ops():
            if op.phase == "backward":
                for t in op.inputs:
                    prod = graph.producers(t)
                    if prod and graph.op(prod[0]).phase == "forward":
                        assert graph.tensors[t].role == Role.ACTIVATION, (op.name, t)


def test_emit_backward_is_one_micro_step_with_loss_seed():
    cfg = make_cfg(QWEN, sequence_len=8)
    graph = emit_backward(inject_lora(build_forward_graph(resolve_model(cfg), cfg), cfg), cfg)
    first_bwd = next(op for op in graph.ops() if op.phase == "backward")
    assert first_bwd.kind == "lm_head_ce_bwd"
    assert graph.meta["backward"] and graph.tensors["loss"].role == Role.ACTIVATION


@pytest.mark.parametrize("n", [1, 4, 7])
def test_lmhead_and_attention_chunking_divide_workspaces(n):
    graph = compile_front(make_cfg(QWEN, sequence_len=64, per_device_train_batch_size=2, lmhead_chunks=n,
                                   attn_bwd_chunks=n))
    rows = 2 * 64
    for op in graph.ops():
        if op.kind in ("lm_head_ce", "lm_head_ce_bwd"):
            assert op.attrs["chunks"] == n
            assert graph.tensors[op.outputs[-1]].shape == (-(-rows // n), 151936)
        if op.kind == "attention_bwd":
            assert op.attrs["chunks"] == n
            assert graph.tensors[op.outputs[-1]].shape == (2, -(-64 // n), 16 * 128)


def test_chunking_option_validation():
    with pytest.raises(UserError, match="lmhead_chunks"):
        compile_front(make_cfg(QWEN, sequence_len=8, lmhead_chunks=0))


def test_qwen3_32b_front_half_builds():
    graph = compile_front(make_cfg("Qwen/Qwen3-32B", lora=True, recompute=True, sequence_len=2048))
    assert graph.meta["num_layers"] == 64
    assert len([t for t in graph.tensors.values() if t.role == Role.GRADIENT]) == 64 * 7 * 2


def test_lora_targets_absent_from_model_is_a_user_error():
    cfg = make_cfg("Qwen/Qwen3-30B-A3B", lora=True, lora_target_modules=("gate_proj", "up_proj"), sequence_len=8,
                   per_device_train_batch_size=1)
    with pytest.raises(UserError, match="nothing would be trained"):
        inject_lora(build_forward_graph(resolve_model(cfg), cfg), cfg)


@pytest.mark.parametrize("over", [
    dict(lora=True, qlora_bnb=True, recompute=True, lmhead_chunks=2),
    dict(lora=False, recipe="fp8_hybrid", recompute=True, master_dtype="fp32"),
    dict(lora=True, recipe="nvfp4", lora_dropout=0.1),
])
def test_compiled_graphs_use_only_declared_op_kinds(over):
    from surogate.compiler.ops import OPS

    for model in (QWEN, "Qwen/Qwen3-30B-A3B"):
        extra = dict(router_aux_loss_coef=0.01, qlora_selective_expert_dequant=True) if "A3B" in model else {}
        graph = compile_front(make_cfg(model, sequence_len=16, per_device_train_batch_size=1, **over, **extra))
        graph.check()
        assert {op.kind for op in graph.ops()} <= set(OPS)
        assert {op.phase for op in graph.ops()} == {"forward", "backward"}


def test_keeping_the_attention_outputs_skips_the_attention_forward_in_recompute(monkeypatch):
    """SUROGATE_RECOMPUTE_KEEP=attention: each layer's attention output and log-sum-exp are saved, so the recompute
    rebuilds q/k/v (the attention backward reads them) but runs no attention forward; with ffn_input both apply.
    (compile_front: before the fusion passes, so the q/k norm and the rotation are still two ops.)"""
    cfg = make_cfg(QWEN, lora=True, recompute=True, sequence_len=64)
    rc = compile_front(cfg)
    recomputed = lambda g: [op for op in g.ops() if op.attrs.get("recompute")]  # noqa: E731
    saved = lambda g: {t.name for t in g.tensors.values() if t.role == Role.ACTIVATION and t.layer is not None}  # noqa: E731
    assert "attention" in {op.kind for op in recomputed(rc)}
    for env, extra in (("attention", set()), ("attention,ffn_input", {"mid"})):
        monkeypatch.setenv("SUROGATE_RECOMPUTE_KEEP", env)
        keep = compile_front(cfg)
        keep.check()
        kinds = {op.kind for op in recomputed(keep)}
        assert "attention" not in kinds and {"linear", "rope"} <= kinds, (env, kinds)
        assert saved(keep) == {f"L{i}.{w}" for i in range(28) for w in ("out", "attn", "attn_lse", *extra)} | _lora_a(), env
        bwd = next(op for op in keep.ops() if op.kind == "attention_bwd" and op.layer == 3)
        assert {"L3.attn", "L3.attn_lse", "L3.q_rope@rc", "L3.k_rope@rc", "L3.v@rc"} <= set(bwd.inputs), bwd.inputs
        assert len(recomputed(keep)) < len(recomputed(rc))
        assert _bytes(keep, Role.ACTIVATION) > _bytes(rc, Role.ACTIVATION)
    monkeypatch.setenv("SUROGATE_RECOMPUTE_KEEP", "atention")
    with pytest.raises(UserError, match=r"SUROGATE_RECOMPUTE_KEEP \(environment\): unknown \['atention'\]"):
        compile_front(cfg)


def test_keeping_the_mid_layer_residual_skips_the_output_projection_in_recompute(monkeypatch):
    """SUROGATE_RECOMPUTE_KEEP=ffn_input: L{i}.mid is saved too, so the recompute rebuilds the attention block
    without o_proj (its output only fed the residual add) and the MLP block from the saved mid."""
    cfg = make_cfg(QWEN, lora=True, recompute=True, sequence_len=64)
    rc = compile_front(cfg)
    monkeypatch.setenv("SUROGATE_RECOMPUTE_KEEP", "ffn_input")
    keep = compile_front(cfg)
    keep.check()
    saved = {t.name for t in keep.tensors.values() if t.role == Role.ACTIVATION and t.layer is not None}
    assert saved == {f"L{i}.{w}" for i in range(28) for w in ("out", "mid")} | _lora_a()
    recomputed = lambda g: {op.name.removeprefix("rc:") for op in g.ops() if op.attrs.get("recompute")}  # noqa: E731
    gone = recomputed(rc) - recomputed(keep)
    assert {"L3.o", "L3.o.lora_add", "L3.attn_res"} <= gone, sorted(n for n in gone if "L3." in n)
    assert recomputed(keep) < recomputed(rc) and "L3.o.lora_a" not in recomputed(rc)  # h_o is kept
    assert _bytes(keep, Role.ACTIVATION) > _bytes(rc, Role.ACTIVATION)
    for op in keep.ops():  # the backward reads the forward's mid, no recomputed copy
        assert "L3.mid@rc" not in op.inputs
