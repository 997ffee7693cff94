"""Passes `fuse_lora_merge` (every LoRA up-projection + merge add becomes one `lora_merge`, forward and recompute),
`fuse_add_rmsnorm` (a residual add and the norm that reads it next become one `add_rmsnorm`) and
`fuse_rmsnorm_rope` (a q/k norm and the rotation that reads it become one `rmsnorm_rope`)."""

from __future__ import annotations

from surogate.compiler.ir import Op, Role, Tensor
from surogate.compiler.models import build_forward_graph, resolve_model
from surogate.compiler.passes import fusion
from surogate.compiler.passes.autodiff import emit_backward
from surogate.compiler.passes.lora import inject_lora
from surogate.compiler.passes.precision import annotate_precision
from surogate.compiler.pipeline import PASS_NAMES
from tests.compiler_front.helpers import make_cfg, qwen3_graph_before_fusion

QWEN = "Qwen/Qwen3-0.6B"


_graph = qwen3_graph_before_fusion


def _add_reader(graph, tensor: str, after: str) -> None:
    """A layer-0 forward `identity` op reading `tensor`, placed right after op `after` (a reader fusion must see)."""
    t = graph.tensors[tensor]
    graph.add_tensor(Tensor("spy", t.shape, t.dtype, Role.ACTIVATION, layer=0))
    graph.add_op(Op("spy", "identity", [tensor], ["spy"], {}, "forward", 0), after=after)


def test_passes_sit_between_recompute_and_chunking():
    i = PASS_NAMES.index("fuse_lora_merge")
    assert PASS_NAMES[i - 1 : i + 5] == ["recompute", "fuse_lora_merge", "fuse_add_rmsnorm", "fuse_rmsnorm_rope",
                                         "fuse_lm_head_ce", "chunking"]


def test_every_merge_is_fused_and_the_product_tensor_is_gone():
    graph, cfg = _graph()
    merges = [op for op in graph.ops() if op.kind == "add" and op.attrs.get("lora") == "merge"]
    ups = {op.name: op for op in graph.ops() if op.kind == "linear" and op.attrs.get("lora") == "B"}
    products = [t for t in graph.tensors if t.endswith(".lora_b") or t.endswith(".lora_b@rc")]
    assert len(merges) == len(ups) == len(products) > 28 * 7  # forward and recomputed copies
    fusion.fuse_lora_merge(graph, cfg)
    graph.check()
    assert graph.meta["lora_merge_fused"] == len(merges)
    assert not any(op.kind == "linear" and op.attrs.get("lora") == "B" for op in graph.ops())
    assert not any(t in graph.tensors for t in products)
    fused = [op for op in graph.ops() if op.kind == "lora_merge"]
    assert len(fused) == len(merges)
    assert sum(op.phase == "backward" and op.attrs.get("recompute") for op in fused) > 0
    op = graph.op("L0.q.lora_add")
    assert op.inputs == ["L0.q.base", "L0.q.lora_a", "model.layers.0.self_attn.q_proj.lora_B.weight"]
    assert op.outputs == ["L0.q"] and op.attrs["scale"] == 2.0 and op.attrs["lora"] == "merge"
    # B still gets its gradient, from h and the output gradient (never from the removed product)
    b_grad = [o for o in graph.ops() if o.kind == "linear_bwd_weight"
              and any("q_proj.lora_B" in t for t in o.outputs) and o.layer == 0]
    assert b_grad and b_grad[0].inputs[1] in ("L0.q.lora_a", "L0.q.lora_a@rc")


def test_switch_off_and_no_lora_leave_the_graph_alone():
    graph, cfg = _graph()
    before = [(op.name, op.kind, list(op.inputs)) for op in graph.ops()]
    fusion.fuse_lora_merge(graph, cfg, enabled=False)
    assert [(op.name, op.kind, list(op.inputs)) for op in graph.ops()] == before
    assert graph.meta["lora_merge_fused"] == 0
    cfg = make_cfg(QWEN, lora=False, sequence_len=8)
    graph = emit_backward(annotate_precision(inject_lora(build_forward_graph(resolve_model(cfg), cfg), cfg), cfg), cfg)
    kinds = [op.kind for op in graph.ops()]
    assert [op.kind for op in fusion.fuse_lora_merge(graph, cfg).ops()] == kinds


def test_a_product_with_another_reader_is_not_fused():
    graph, cfg = _graph()
    _add_reader(graph, "L0.q.lora_b", after="L0.q.lora_add")
    fusion.fuse_lora_merge(graph, cfg)
    assert graph.op("L0.q.lora_add").kind == "add" and "L0.q.lora_b" in graph.tensors
    assert graph.op("L0.k.lora_add").kind == "lora_merge"


# ---------------------------------------------------------------- fuse_add_rmsnorm


def test_every_residual_add_read_next_by_a_norm_is_fused():
    graph, cfg = _graph()
    fusion.fuse_lora_merge(graph, cfg)
    adds = [op for op in graph.ops() if op.kind == "add" and not op.attrs.get("lora")]
    # forward: attn_res -> mlp_norm and mlp_res -> the next attn_norm (the last -> final_norm); recompute: attn_res
    assert len(adds) == 3 * 28
    norms_before = sum(op.kind == "rmsnorm" for op in graph.ops())
    fusion.fuse_add_rmsnorm(graph, cfg)
    graph.check()
    assert graph.meta["add_rmsnorm_fused"] == 3 * 28
    assert not any(op.kind == "add" and not op.attrs.get("lora") for op in graph.ops())
    assert sum(op.kind == "rmsnorm" for op in graph.ops()) == norms_before - 3 * 28
    op = graph.op("L1.attn_norm")  # keeps the norm's name (its backward ops' fwd_op)
    assert op.kind == "add_rmsnorm" and op.attrs["fused_add"] == "L0.mlp_res"
    assert op.inputs == ["L0.mid", "L0.down", "model.layers.1.input_layernorm.weight"]
    assert op.outputs == ["L1.attn_norm", "L0.out"]
    assert graph.op("final_norm").kind == "add_rmsnorm"
    rc = graph.op("rc:L0.mlp_norm")
    assert rc.kind == "add_rmsnorm" and rc.outputs[1] == "L0.mid@rc" and rc.attrs.get("recompute")
    # the sums stay planned tensors: the backward norms and the next residual adds read them
    assert any(o.kind == "rmsnorm_bwd" and "L0.mid@rc" in o.inputs for o in graph.ops())


def test_an_op_between_the_add_and_the_norm_blocks_the_fusion():
    graph, cfg = _graph()
    _add_reader(graph, "L0.mid", after="L0.attn_res")
    fusion.fuse_add_rmsnorm(graph, cfg)
    assert graph.op("L0.attn_res").kind == "add" and graph.op("L0.mlp_norm").kind == "rmsnorm"
    assert graph.op("L1.attn_norm").kind == "add_rmsnorm"


def test_add_rmsnorm_switch_off_and_dtype_mismatch_leave_pairs():
    graph, cfg = _graph()
    kinds = [op.kind for op in graph.ops()]
    assert [op.kind for op in fusion.fuse_add_rmsnorm(graph, cfg, enabled=False).ops()] == kinds
    assert graph.meta["add_rmsnorm_fused"] == 0
    graph.update_tensor("L0.down", dtype="fp32")  # mixed dtypes: the kernel's residual add would round differently
    fusion.fuse_add_rmsnorm(graph, cfg)
    assert graph.op("L0.mlp_res").kind == "add" and graph.op("L1.attn_norm").kind == "rmsnorm"


# ---------------------------------------------------------------- fuse_rmsnorm_rope


def test_every_qk_norm_read_by_its_rotation_is_fused():
    graph, cfg = _graph()
    ropes = [op for op in graph.ops() if op.kind == "rope"]
    assert len(ropes) == 2 * 2 * 28  # q and k, forward and recomputed
    fusion.fuse_rmsnorm_rope(graph, cfg)
    graph.check()
    assert not any(op.kind == "rope" for op in graph.ops())
    assert not any(op.kind == "rmsnorm" and op.attrs.get("group") for op in graph.ops())
    op = graph.op("L0.q_rope")  # keeps the rope's name and place, takes the norm's input, weight and eps
    assert op.kind == "rmsnorm_rope" and op.attrs["fused_norm"] == "L0.q_norm"
    assert op.inputs[:2] == ["L0.q", "model.layers.0.self_attn.q_norm.weight"] and op.outputs == ["L0.q_rope"]
    assert op.attrs["group"] == op.attrs["head_dim"] == 128 and op.attrs["eps"] > 0
    assert "L0.q_norm" not in graph.tensors and "L0.q_norm@rc" not in graph.tensors  # no longer planned
    assert graph.op("rc:L0.k_rope").kind == "rmsnorm_rope"
    # the backward: the norm's backward takes rope's backward as its prologue (frozen norms: no dweight reader)
    assert not any(op.kind == "rope_bwd" for op in graph.ops())
    bwd = graph.op("L0.q_norm.bwd.rmsnorm_bwd")
    assert bwd.kind == "rmsnorm_rope_bwd" and bwd.attrs["fwd_op"] == "L0.q_norm"
    assert bwd.inputs == ["d:L0.q_rope", "L0.q@rc", "model.layers.0.self_attn.q_norm.weight", "position_ids",
                          "rope.cos", "rope.sin"] and bwd.outputs == ["d:L0.q"]
    assert bwd.attrs["head_dim"] == bwd.attrs["group"] == 128 and "d:L0.q_norm" not in graph.tensors
    assert graph.meta["rmsnorm_rope_fused"] == 2 * len(ropes) - 2 * 28  # forward + recompute + backward


def test_a_trained_norm_weight_keeps_the_backward_pair():
    graph, cfg = _graph(lora=False)  # full fine-tune: rmsnorm_bwd_weight also reads the rotated gradient
    fusion.fuse_rmsnorm_rope(graph, cfg)
    assert graph.op("L0.q_rope").kind == "rmsnorm_rope"
    assert graph.op("L0.q_norm.bwd.rmsnorm_bwd").kind == "rmsnorm_bwd"
    assert any(op.kind == "rope_bwd" for op in graph.ops())


def test_a_norm_with_another_reader_or_fused_rope_is_not_fused():
    graph, cfg = _graph()
    _add_reader(graph, "L0.q_norm", after="L0.q_norm")
    fusion.fuse_rmsnorm_rope(graph, cfg)
    assert graph.op("L0.q_rope").kind == "rope" and "L0.q_norm" in graph.tensors
    assert graph.op("L0.k_rope").kind == "rmsnorm_rope"
    graph, cfg = _graph(use_fused_rope=True)  # sin/cos computed on the fly: the epilogue reads tables only
    kinds = [op.kind for op in graph.ops()]
    assert [op.kind for op in fusion.fuse_rmsnorm_rope(graph, cfg).ops()] == kinds


def test_rmsnorm_rope_switch_off_and_dtype_mismatch_leave_pairs():
    graph, cfg = _graph()
    kinds = [op.kind for op in graph.ops()]
    assert [op.kind for op in fusion.fuse_rmsnorm_rope(graph, cfg, enabled=False).ops()] == kinds
    graph.update_tensor("L0.q_norm", dtype="fp32")  # an fp32 normalised tensor: not the kernel's rounding
    fusion.fuse_rmsnorm_rope(graph, cfg)
    assert graph.op("L0.q_rope").kind == "rope" and graph.op("L0.k_rope").kind == "rmsnorm_rope"


def test_env_turns_named_fusions_off(monkeypatch):
    monkeypatch.setenv("SUROGATE_FUSIONS_OFF", "fuse_rmsnorm_rope, fuse_lora_merge")
    graph, cfg = _graph()
    kinds = [op.kind for op in graph.ops()]
    fusion.fuse_lora_merge(graph, cfg)
    fusion.fuse_rmsnorm_rope(graph, cfg)
    assert [op.kind for op in graph.ops()] == kinds
    fusion.fuse_add_rmsnorm(graph, cfg)  # not named: still runs
    assert graph.meta["add_rmsnorm_fused"] > 0
    assert fusion.fuse_rmsnorm_rope(graph, cfg, enabled=True).meta["rmsnorm_rope_fused"] > 0  # an explicit call wins


def test_env_all_turns_every_fusion_off(monkeypatch):
    monkeypatch.setenv("SUROGATE_FUSIONS_OFF", fusion.OFF_ALL)
    graph, cfg = _graph()
    kinds = [op.kind for op in graph.ops()]
    for fuse in (fusion.fuse_lora_merge, fusion.fuse_add_rmsnorm, fusion.fuse_rmsnorm_rope):
        fuse(graph, cfg)
    assert [op.kind for op in graph.ops()] == kinds
