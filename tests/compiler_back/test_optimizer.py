import math

import pytest

from surogate.compiler.ir import GraphError, Role, Space
from surogate.compiler.passes.optimizer import ADAMW8BIT_BLOCK, build_optimizer, normalize_dtype

from . import synth
from .helpers import back_half


def _states(plan, weight):
    return {t.attrs["state"]: t for t in plan.tensors.values() if t.attrs.get("state_of") == weight}


def test_adamw8bit_layout_per_trainable_tensor():
    plan = back_half(weight_decay=0.05, adamw_beta1=0.8, adamw_beta2=0.95, adamw_epsilon=1e-6, learning_rate=1e-3)
    w = plan.tensors["L0.w1"]
    st = _states(plan, "L0.w1")
    assert set(st) == {"m", "v", "m_absmax", "v_absmax"}
    assert st["m"].dtype == st["v"].dtype == "uint8" and st["m"].nbytes == w.numel
    blocks = math.ceil(w.numel / ADAMW8BIT_BLOCK)
    assert st["m_absmax"].shape == (blocks,) and st["m_absmax"].dtype == "fp32"
    steps = [op for op in plan.ops if op.kind == "adamw8bit_step"]
    trainable = [t for t in plan.tensors.values() if t.role is Role.TRAINABLE_WEIGHT]
    assert len(steps) == len(trainable)
    step = next(op for op in steps if "L0.w1" in op.outputs)
    assert step.attrs["beta1"] == 0.8 and step.attrs["beta2"] == 0.95 and step.attrs["epsilon"] == 1e-6
    assert step.attrs["lr"] == 1e-3 and step.attrs["block_size"] == ADAMW8BIT_BLOCK
    assert step.attrs["decay"] is True and step.attrs["weight_decay"] == 0.05
    norm = next(op for op in steps if "L0.norm.weight" in op.outputs)
    assert norm.attrs["decay"] is False and norm.attrs["weight_decay"] == 0.0
    assert "grad.L0.w1" in step.inputs


def test_normuon_layout_hidden_matrices_vs_rest():
    plan = back_half(optimizer="normuon", normuon_momentum=0.9, normuon_beta2=0.8, normuon_cautious_wd=False)
    st = _states(plan, "L1.w2")
    assert set(st) == {"momentum", "row_variance"}
    w = plan.tensors["L1.w2"]
    assert st["momentum"].shape == w.shape
    assert st["row_variance"].shape == (w.shape[0],) and st["row_variance"].dtype == "fp32"
    # Embeddings, LM head and norms keep the 8-bit AdamW layout.
    for other in ("embed.weight", "lm_head.weight", "L1.norm.weight"):
        assert "m" in _states(plan, other)
    kinds = {op.outputs[0]: op for op in plan.ops if op.phase == "optimizer" and op.kind.endswith("_step")}
    assert kinds["L1.w2"].kind == "normuon_step" and kinds["L1.w2"].attrs["momentum"] == 0.9
    assert kinds["L1.w2"].attrs["beta2"] == 0.8 and kinds["L1.w2"].attrs["cautious_wd"] is False
    assert kinds["embed.weight"].kind == "adamw8bit_step"


def test_max_grad_norm_adds_norm_and_clip_ops():
    assert not [op for op in back_half().ops if op.kind == "grad_norm"]
    plan = back_half(max_grad_norm=1.0)
    norm = plan.op_index("optimizer:grad_norm")
    clip = plan.op_index("optimizer:grad_clip_scale")
    steps = [i for i, op in enumerate(plan.ops) if op.kind.endswith("_step")]
    assert norm < clip < min(steps)
    assert plan.ops[clip].attrs["max_grad_norm"] == 1.0
    assert all("grad_clip_scale" in plan.ops[i].inputs for i in steps)
    grads = {t for t in plan.tensors if plan.tensors[t].role is Role.GRADIENT}
    assert set(plan.ops[norm].inputs) == grads


def test_master_weights_follow_master_dtype():
    assert not [t for t in back_half().tensors.values() if t.role is Role.MASTER_WEIGHT]
    assert not [t for t in back_half(master_dtype="bfloat16").tensors.values() if t.role is Role.MASTER_WEIGHT]
    plan = back_half(master_dtype="float32")
    masters = [t for t in plan.tensors.values() if t.role is Role.MASTER_WEIGHT]
    trainable = [t for t in plan.tensors.values() if t.role is Role.TRAINABLE_WEIGHT]
    assert len(masters) == len(trainable) and all(m.dtype == "fp32" for m in masters)
    step = next(op for op in plan.ops if op.name == "optimizer:L0.w1")
    assert "L0.w1@master" in step.inputs and "L0.w1@master" in step.outputs


def test_lora_only_adapters_get_states():
    plan = back_half(dict(lora_rank=4))
    owners = {t.attrs["state_of"] for t in plan.tensors.values() if t.role is Role.OPTIMIZER_STATE}
    assert owners == {t.name for t in plan.tensors.values() if t.role is Role.TRAINABLE_WEIGHT}
    assert all(".lora_" in o for o in owners)
    assert plan.meta["parameters"]["trainable"] == 3 * 4 * (256 + 512)  # 3 layers x rank 4 x (in + out)


def test_trainable_weight_without_gradient_is_a_compiler_error():
    g = synth.build()
    g.remove_tensor("grad.L0.w1")  # never referenced by an op after we drop it from its writer
    op = g.op("L0.mm1_bwd")
    op.outputs.remove("grad.L0.w1")
    g.rewire()
    g.meta["zero"] = {"world": 1, "optimizer": False}
    with pytest.raises(GraphError, match="no gradient"):
        build_optimizer(g, synth.cfg())


def test_offloaded_grads_are_staged_for_the_step():
    plan = back_half(offload_grads=True, shard_gradients=True, max_grad_norm=1.0)
    for op in plan.ops:
        if op.kind.endswith("_step"):
            assert all(plan.tensors[t].space is Space.DEVICE for t in op.inputs)
    assert plan.ops[plan.op_index("optimizer:grad_norm")].attrs["zero_copy"] is True


def test_normalize_dtype():
    assert normalize_dtype("float32") == "fp32" and normalize_dtype("BF16") == "bf16" and normalize_dtype(None) is None
