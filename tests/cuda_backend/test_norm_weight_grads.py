"""CudaState.norm_weight_grads: which RMSNorm backward kernels must sum dweight (the rest skip it)."""

from __future__ import annotations

from surogate.runtime.backends.cuda_state import CudaState
from tests.compiler_front.helpers import qwen3_graph_before_fusion as _graph


def test_lora_norms_are_frozen_and_full_fine_tune_norms_are_not():
    st = CudaState()
    lora, _ = _graph()
    assert st.norm_weight_grads(lora) == frozenset()  # LoRA: every norm weight frozen, no dweight work
    full, _ = _graph(lora=False)
    names = st.norm_weight_grads(full)
    assert {"L0.q_norm", "L0.k_norm", "L0.attn_norm", "L0.mlp_norm", "final_norm"} <= names
    assert names == {op.attrs["fwd_op"] for op in full.ops() if op.kind == "rmsnorm_bwd_weight"}
    assert st.norm_weight_grads(full) is names  # computed once per plan
