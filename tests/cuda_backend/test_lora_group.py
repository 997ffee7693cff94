"""Pass `group_lora_projections`: LoRA down-projections sharing an input run as one GEMM over their stacked A
weights (q/k/v, gate/up). Checked here: which plans get stacks, the planner's layout (stacks back to back, column
views inside their parents), and that the stacked program computes what the unstacked one does on both kernel
tables (cpu; cuda under the simulator, where the stacked GEMMs read the planned stacks in place)."""

from __future__ import annotations

import pytest
import torch

from surogate.compiler.ir import view_parent
from surogate.compiler.passes.fusion import OFF_ENV
from surogate.compiler.pipeline import compile_plan
from surogate.runtime.backends.cuda_gemm import stacked_rows
from tests.cuda_backend.helpers import (
    Runner,
    assert_close_grads,
    batch,
    lora_b_weights,
    record_copies,
    rel_err,
    save_sim_model,
    sim_cfg,
)

LORA = dict(lora=True, lora_rank=4, lora_alpha=8, recompute=True)
STACKED = {"linear_stacked", "linear_stacked_bwd_data", "linear_stacked_bwd_weight"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_sim_model(tmp_path_factory.mktemp("lora_group") / "qwen3", num_hidden_layers=2)


def _kinds(plan) -> dict[str, int]:
    out: dict[str, int] = {}
    for op in plan.ops:
        out[op.kind] = out.get(op.kind, 0) + 1
    return out


def _unfolded(cfg, monkeypatch):
    """The stacking pass's own program: the up-projections not folded into the base GEMMs (lora_fold.py)."""
    with monkeypatch.context() as m:
        m.setenv(OFF_ENV, "fold_lora_up_projection")
        return compile_plan(cfg)


def test_qkv_and_gate_up_are_stacked_per_layer(model_dir, monkeypatch):
    plan = _unfolded(sim_cfg(model_dir, **LORA), monkeypatch)
    kinds = _kinds(plan)
    # 2 layers x (q/k/v, gate/up), for the adapters' A weights and for the frozen base weights
    assert plan.meta["lora_groups"] == 4 and plan.meta["base_groups"] == 4
    # forward + recompute of the base GEMMs (the adapters' h is kept, not recomputed)
    assert kinds["linear_stacked"] == 4 + 2 * 4 and kinds["linear_stacked_bwd_weight"] == 4
    # data gradients: the adapters' (layer 0's q/k/v input, the embedding output, needs none in a LoRA model:
    # 3) and the base gate/up's, whose output gradients swiglu_bwd writes as column views (2; q/k/v's come
    # from attention and the q/k norm kernels and stay three GEMMs)
    assert kinds["linear_stacked_bwd_data"] == 3 + 2
    # o and down have no partner: their GEMMs stay
    lora_a = [op for op in plan.ops if op.kind == "linear" and op.attrs.get("lora") == "A"]
    assert sorted({op.name.split(".")[1] for op in lora_a}) == ["down", "o"]
    base = [op for op in plan.ops if op.kind == "linear" and "lora" not in op.attrs and op.layer is not None]
    assert sorted({op.name.split(".")[1] for op in base}) == ["down", "o"]


def test_stacks_are_back_to_back_and_views_sit_inside_their_parents(model_dir, monkeypatch):
    plan = _unfolded(sim_cfg(model_dir, **LORA), monkeypatch)
    stacks = plan.meta["stacks"]
    assert len(stacks) == 4 * 2 + 4  # adapters: weights and gradients; base: frozen weights
    for members in stacks.values():
        ts = [plan.tensors[m] for m in members]
        for a, b in zip(ts, ts[1:], strict=False):
            assert b.offset == a.offset + a.nbytes, (a.name, b.name)
    views = {n: t for n, t in plan.tensors.items() if view_parent(t)}
    # per layer: h and dh of 5 adapters; the 5 base outputs, their recomputed copies, d_gate and d_up
    assert len(views) == 2 * (5 * 2 + 5 * 2 + 2)
    for n, t in views.items():
        p = plan.tensors[view_parent(t)]
        col = t.attrs["view"]["col"]
        assert t.offset == p.offset + col * 4 and col + t.shape[-1] <= p.shape[-1], n
        assert plan.lifetimes[n] == plan.lifetimes[p.name], n
    # every access of a view lies inside its parent's lifetime
    for i, op in enumerate(plan.ops):
        for n in (*op.inputs, *op.outputs):
            if n in views:
                start, end = plan.lifetimes[n]
                assert start <= i <= end, (op.name, n)


@pytest.mark.parametrize("why,over", [
    ("dropout: each adapter reads its own x'", dict(lora_dropout=0.1)),
    ("fp32 adapters on bf16 activations", dict(torch_dtype="bfloat16", lora_dtype="fp32")),
])
def test_adapters_not_stacked_where_the_stack_would_not_be_one_gemm(model_dir, why, over):
    plan = compile_plan(sim_cfg(model_dir, **{**LORA, **over}))
    assert plan.meta["lora_groups"] == 0, why
    assert not any(op.kind.startswith("linear_stacked") and op.attrs.get("lora") for op in plan.ops)
    assert plan.meta["base_groups"] == 4  # the frozen base projections still share their input


def test_full_fine_tune_is_left_alone(model_dir):
    plan = compile_plan(sim_cfg(model_dir, recompute=True))
    assert plan.meta["lora_groups"] == plan.meta["base_groups"] == 0 and not STACKED & set(_kinds(plan))


def test_switched_off_by_environment(model_dir, monkeypatch):
    monkeypatch.setenv(OFF_ENV, "group_lora_projections")
    plan = compile_plan(sim_cfg(model_dir, **LORA))
    assert plan.meta["lora_groups"] == plan.meta["base_groups"] == 0 and not STACKED & set(_kinds(plan))
    assert not any(view_parent(t) for t in plan.tensors.values())


def test_stacked_rows_only_for_adjacent_tensors():
    buf = torch.arange(24.0)
    a, b, c = buf[:8].view(2, 4), buf[8:16].view(2, 4), buf[16:].view(2, 4)
    whole = stacked_rows([a, b, c])
    assert whole is not None and whole.data_ptr() == a.data_ptr() and torch.equal(whole, buf.view(6, 4))
    assert stacked_rows([a, c]) is None  # a gap
    assert stacked_rows([b, a]) is None  # out of order
    assert stacked_rows([a, torch.arange(8.0).view(2, 4)]) is None  # another allocation
    # column views of adjacent wider matrices ([W | tail] weights): one strided matrix over their rows
    wa, wb = buf[:12].view(2, 6), buf[12:].view(2, 6)
    whole = stacked_rows([wa[:, :4], wb[:, :4]])
    assert whole is not None and whole.stride() == (6, 1) and torch.equal(whole, buf.view(4, 6)[:, :4])
    assert stacked_rows([wa[:, :4], wb[:, 1:5]]) is None  # not the same columns
    assert stacked_rows([wb[:, :4], wa[:, :4]]) is None


def _unstacked_plan(cfg, monkeypatch):
    with monkeypatch.context() as m:
        m.setenv(OFF_ENV, "group_lora_projections")
        return compile_plan(cfg)


# the cuda table under the simulator takes ~3 min here (-m slow); its stacked plan is checked against the cpu
# backend, in place, by tests/cuda_backend/test_parity_sim.py's LoRA case in the default run
@pytest.mark.parametrize("backend", ["cpu", pytest.param("cuda", marks=pytest.mark.slow)])
def test_stacked_program_computes_what_the_unstacked_one_does(model_dir, monkeypatch, backend):
    """Loss, every gradient and one optimizer step of the stacked plan against the unstacked plan on the same
    backend (fp32 model: equal to fp32 rounding; the K = 3r data gradient sums in another order)."""
    cfg = sim_cfg(model_dir, batch=2, **LORA)
    stacked, plain = compile_plan(cfg), _unstacked_plan(cfg, monkeypatch)
    assert stacked.meta["lora_groups"] == stacked.meta["base_groups"] == 4
    assert plain.meta["lora_groups"] == plain.meta["base_groups"] == 0
    weights = lora_b_weights(stacked)
    runs = [Runner(cfg, backend, plan=p, weights=weights) for p in (stacked, plain)]
    copies = record_copies(runs[0]) if backend == "cuda" else []
    ids, labels = batch(2, 8)
    (l0, g0), (l1, g1) = (r.micro_step(ids, labels) for r in runs)
    assert abs(l0 - l1) <= 1e-6 * abs(l1)
    assert_close_grads(g0, g1, 1e-5)
    before = runs[0].trainable()
    for r in runs:
        r.optimizer_step(0)
    w0, w1 = runs[0].trainable(), runs[1].trainable()
    for n in w1:
        assert not torch.equal(w0[n], before[n]) and rel_err(w0[n] - before[n], w1[n] - before[n]) < 1e-4, n
    stacked_outputs = {o for op in stacked.ops if op.kind in STACKED | {"lora_merge"} for o in op.outputs}
    assert not stacked_outputs & set(copies), "a stacked GEMM or merge went through a temporary"


class _Bound:
    """A CudaState stand-in: `bind` hands out fixed output views and accumulate flags (same-dtype GEMMs only)."""

    def __init__(self, views, accumulate):
        from types import SimpleNamespace

        self.binding = SimpleNamespace(views=views, accumulate=accumulate)

    def bind(self, ins, attrs, ctx):
        return self.binding


@pytest.mark.parametrize("adjacent", [True, False])
@pytest.mark.parametrize("accumulate", [False, True])
def test_stacked_kernels_with_and_without_the_planned_stack(adjacent, accumulate):
    """The cuda table's stacked GEMMs: one GEMM over adjacent weights, else one per weight; same results."""
    from surogate.runtime.backends import cuda_gemm as cg

    g = torch.Generator().manual_seed(0)
    x, dy = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 6, generator=g)
    buf = torch.randn(3 * 2 * 8, generator=g)
    ws = [buf[i * 16 : (i + 1) * 16].view(2, 8) for i in range(3)]
    if not adjacent:
        ws = [w.clone() for w in ws]
    w = torch.cat(ws)
    start = torch.randn(2, 5, 6, generator=g)
    h = start.clone()
    cg.linear_stacked(_Bound([h], [accumulate]), [x, *ws], {"scale": 0.5}, None)
    torch.testing.assert_close(h, (start if accumulate else 0) + 0.5 * x @ w.t())
    dx0 = torch.randn(2, 5, 8, generator=g)
    dx = dx0.clone()
    cg.linear_stacked_bwd_data(_Bound([dx], [accumulate]), [dy, *ws], {}, None)
    torch.testing.assert_close(dx, (dx0 if accumulate else 0) + dy @ w)
    grads = [t.clone() for t in ws] if not adjacent else [t for t in buf.clone().view(3, 2, 8)]
    g0 = [t.clone() for t in grads]
    cg.linear_stacked_bwd_weight(_Bound(grads, [accumulate] * 3), [dy, x], {}, None)
    full = dy.reshape(-1, 6).t() @ x.reshape(-1, 8)
    for i in range(3):
        torch.testing.assert_close(grads[i], (g0[i] if accumulate else 0) + full[2 * i : 2 * i + 2])
