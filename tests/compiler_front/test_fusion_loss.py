"""Pass `fuse_lm_head_ce`: the LM head's loss and its backward, adjacent in the program, become one
`lm_head_ce_fwd_bwd` in the forward's place (one logits GEMM per row chunk instead of two)."""

from __future__ import annotations

import pytest

from surogate.compiler.ir import Op, Role, Tensor
from surogate.compiler.passes.fusion_loss import FUSED_KIND, fuse_lm_head_ce
from tests.compiler_front.helpers import qwen3_graph_before_fusion, save_tiny


def _pair(graph):
    fwd = next(op for op in graph.ops() if op.kind == "lm_head_ce")
    bwd = next(op for op in graph.ops() if op.kind == "lm_head_ce_bwd")
    return fwd, bwd


def test_the_loss_and_its_backward_become_one_op_in_the_forwards_place():
    graph, cfg = qwen3_graph_before_fusion()
    fwd, bwd = _pair(graph)
    at = graph.order.index(fwd.name)
    assert graph.order[at + 1] == bwd.name  # autodiff emits the loss's backward first
    loss, lse, ws = fwd.outputs
    bwd_ws, grads = bwd.outputs[-1], list(bwd.outputs[:-1])
    n_ops = len(graph.order)
    fuse_lm_head_ce(graph, cfg)
    assert graph.meta["lm_head_ce_fused"] == 1 and len(graph.order) == n_ops - 1
    op = graph.op(fwd.name)
    assert graph.order.index(op.name) == at and op.kind == FUSED_KIND and op.phase == "forward"
    assert op.outputs == [loss, lse, *grads, ws] and grads == ["d:final_norm.out"]
    assert op.attrs["wrt"] == (0,) and op.attrs["fused_bwd"] == bwd.name
    assert bwd_ws not in graph.tensors and bwd.name not in graph.order
    assert not [o for o in graph.ops() if o.kind in ("lm_head_ce", "lm_head_ce_bwd")]
    graph.check()


def test_full_finetune_with_tied_embeddings_keeps_the_weight_gradient(tmp_path):
    from surogate.compiler.pipeline import compile_plan
    from tests.runtime.helpers import make_cfg

    plan = compile_plan(make_cfg(save_tiny(tmp_path, "qwen3", tie=True), sequence_len=8))
    (op,) = [o for o in plan.ops if o.kind == FUSED_KIND]
    assert list(op.attrs["wrt"]) == [0, 1] and op.inputs[1] == "model.embed_tokens.weight"
    dw = op.outputs[3]
    assert plan.tensors[dw].role is Role.GRADIENT and plan.tensors[dw].attrs["grad_of"] == op.inputs[1]
    # the embedding's backward adds into the same gradient after the fused op wrote it
    writers = [i for i, o in enumerate(plan.ops) if dw in o.outputs]
    assert writers[0] == plan.ops.index(op) and plan.ops[writers[-1]].kind == "embedding_bwd"


def _spy_between(graph, fwd):
    t = graph.tensors[fwd.inputs[0]]
    graph.add_tensor(Tensor("spy", t.shape, t.dtype, Role.ACTIVATION))
    graph.add_op(Op("spy", "identity", [fwd.inputs[0]], ["spy"], {}, "backward", None), after=fwd.name)


def _lse_reader(graph, fwd):
    lse = graph.tensors[fwd.outputs[1]]
    graph.add_tensor(Tensor("spy", lse.shape, lse.dtype, Role.ACTIVATION))
    graph.add_op(Op("spy", "identity", [lse.name], ["spy"], {}, "backward", None), after=graph.order[-1])


@pytest.mark.parametrize("change", [_spy_between, _lse_reader], ids=["op-between", "lse-read-elsewhere"])
def test_left_alone_when_the_backward_is_not_next_or_the_lse_has_another_reader(change):
    graph, cfg = qwen3_graph_before_fusion()
    fwd, _ = _pair(graph)
    change(graph, fwd)
    graph.rewire()
    fuse_lm_head_ce(graph, cfg)
    assert graph.meta["lm_head_ce_fused"] == 0
    assert [o.kind for o in graph.ops() if o.kind.startswith("lm_head")] == ["lm_head_ce", "lm_head_ce_bwd"]


def test_switched_off_by_name(monkeypatch):
    graph, cfg = qwen3_graph_before_fusion()
    monkeypatch.setenv("SUROGATE_FUSIONS_OFF", "fuse_add_rmsnorm, fuse_lm_head_ce")
    fuse_lm_head_ce(graph, cfg)
    assert graph.meta["lm_head_ce_fused"] == 0 and len(_pair(graph)) == 2
    fuse_lm_head_ce(graph, cfg, enabled=True)  # an explicit argument wins over the environment
    assert graph.meta["lm_head_ce_fused"] == 1


def test_chunking_sizes_the_fused_ops_workspace():
    from surogate.compiler.passes.chunking import apply_chunking

    graph, cfg = qwen3_graph_before_fusion(lmhead_chunks=3, sequence_len=16, per_device_train_batch_size=2)
    fuse_lm_head_ce(graph, cfg)
    apply_chunking(graph, cfg)
    (op,) = [o for o in graph.ops() if o.kind == FUSED_KIND]
    assert op.attrs["chunks"] == 3 and graph.tensors[op.outputs[-1]].shape == (11, 151936)  # ceil(32 / 3) rows
