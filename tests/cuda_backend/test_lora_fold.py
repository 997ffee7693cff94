"""Pass `fold_lora_up_projection`: q/k/v's and gate/up's LoRA up-projections inside their base GEMMs
(`out_i = [x | h_G] @ [W_i | tail_i]^T`, the tail rewritten from B in each forward). Checked here: which plans fold
and which do not, the planner's layout (X and W+lora own their views' memory, the weights load through their
views), and that the folded program computes what the unfolded one does on both kernel tables and in the
reference interpreter, with and without recompute."""

from __future__ import annotations

import pytest
import torch

from surogate.compiler.ir import view_parent, view_root
from surogate.compiler.passes.fusion import OFF_ENV
from surogate.compiler.pipeline import compile_plan
from surogate.compiler.plan import parameter_counts
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


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_sim_model(tmp_path_factory.mktemp("lora_fold") / "qwen3", num_hidden_layers=2)


def _unfolded(cfg, monkeypatch):
    with monkeypatch.context() as m:
        m.setenv(OFF_ENV, "fold_lora_up_projection")
        return compile_plan(cfg)


def _kinds(plan, **where) -> dict[str, int]:
    out: dict[str, int] = {}
    for op in plan.ops:
        if all(op.attrs.get(k) == v for k, v in where.items()):
            out[op.kind] = out.get(op.kind, 0) + 1
    return out


@pytest.mark.parametrize("recompute", [True, False])
def test_qkv_and_gate_up_fold_and_o_down_keep_their_merges(model_dir, monkeypatch, recompute):
    cfg = sim_cfg(model_dir, **{**LORA, "recompute": recompute})
    plan, plain = compile_plan(cfg), _unfolded(cfg, monkeypatch)
    assert plan.meta["lora_folded"] == 4 and plain.meta["lora_folded"] == 0  # 2 layers x (q/k/v, gate/up)
    runs = 2 if recompute else 1  # forward, and the recompute's copy
    kinds, before = _kinds(plan), _kinds(plain)
    # folded GEMMs in the merges' place, per layer per run: q, k, v one each; gate/up one stacked GEMM (swiglu and
    # its backward read gate and up as column views of its output); merges left: o's and down's only; one tail
    # write per adapter per forward
    folded = _kinds(plan, lora_fold=True)
    assert folded["linear"] == 2 * 3 * runs and folded["linear_stacked"] == 2 * runs
    assert plan.meta["lora_fold_fused"] == 2 * 5 * runs == before["lora_merge"] - kinds["lora_merge"]
    assert {op.name.split(".")[1] for op in plan.ops if op.kind == "lora_merge"} == {"o", "down"}
    assert kinds["lora_fold_tail"] == 2 * 5
    # the base GEMMs of q/k/v and gate/up went (their stacked forward ops) and gate/up's fold is stacked; with
    # recompute the group's down-projection runs again into the recomputed X (instead of h being kept)
    assert kinds["linear_stacked"] == before["linear_stacked"] - 4 * runs + 4 * (runs - 1) + 2 * runs
    fold_ins = {op.inputs[0] for op in plan.ops if op.attrs.get("lora_fold") and op.kind.startswith("linear")
                and not op.kind.endswith("_bwd_data")}
    gate_up = [op for op in plan.ops if op.attrs.get("lora_fold") and op.kind == "linear_stacked"]
    assert all(view_parent(plan.tensors[v]) == op.outputs[0] for op in gate_up
               for v in (op.outputs[0].split("+")[0], op.outputs[0].split("+")[0].replace("gate", "up")))
    assert all(n.endswith("+lora") and view_parent(plan.tensors[n]) is None for n in fold_ins)
    # every B gradient of a folded adapter reads an h inside the X its run built
    for op in plan.ops:
        if op.kind == "linear_bwd_weight" and ".lora_B." in op.outputs[0] and (".o_proj" not in op.outputs[0]
                                                                                 and ".down_proj" not in op.outputs[0]):
            h = op.inputs[1]
            assert view_root(plan.tensors, h) in fold_ins and h.endswith("@rc") == recompute, (op.name, h)
    assert parameter_counts(plan.tensors, set(plan.tensors)) == parameter_counts(plain.tensors, set(plain.tensors))
    # the data gradient: [dx | dh_G] = sum_i dy_i @ [W_i | tail_i] where the input needs a gradient (not layer
    # 0's q/k/v: the embedding is frozen): layer 0's gate/up, layer 1's q/k/v and gate/up
    assert plan.meta["lora_folded_backward"] == 3
    data = [op for op in plan.ops if op.attrs.get("lora_fold") and op.kind.endswith("_bwd_data")]
    assert len(data) == 3 + 1 + 1  # q, k, v one each; gate/up one stacked GEMM each layer
    assert all(op.outputs[0].endswith("+lora") and op.inputs[-1].endswith("+lora") for op in data)
    # the adapters' dh = s * dy @ B GEMMs left: o's and down's, and layer 0's q/k/v (their dh still feeds dA)
    dh = [op.inputs[1] for op in plan.ops if op.kind == "linear_bwd_data" and ".lora_B." in op.inputs[1]]
    assert len(dh) == 2 * 2 + 3 and len([n for n in dh if "layers.0.self_attn" in n and "o_proj" not in n]) == 3
    for op in data:  # dh_G's readers (the down-projection's gradients) come after every write of [dx | dh_G]
        at = plan.ops.index(op)
        readers = [i for i, o in enumerate(plan.ops) if any(view_root(plan.tensors, n) == op.outputs[0]
                                                            for n in o.inputs)]
        assert readers and min(readers) > at, op.name


def test_layout_views_inside_owners_and_stacks_back_to_back(model_dir):
    plan = compile_plan(sim_cfg(model_dir, **LORA))
    isz = 4
    views = {n: t for n, t in plan.tensors.items() if view_parent(t)}
    for n, t in views.items():
        p = plan.tensors[view_parent(t)]
        col = t.attrs["view"]["col"]
        assert t.offset == p.offset + col * isz and col + t.shape[-1] <= p.shape[-1], n
        assert plan.lifetimes[n] == plan.lifetimes[view_root(plan.tensors, n)], n
    # the frozen q_proj weight is the first `in` columns of its [W | tail]; tails hold 3 (2) slots of rank 4
    w = plan.tensors["model.layers.0.self_attn.q_proj.weight"]
    aug = plan.tensors[view_parent(w)]
    tail = plan.tensors[aug.name + ".tail"]
    assert aug.shape == (w.shape[0], w.shape[1] + 12) and tail.shape == (w.shape[0], 12) and w.source
    assert plan.tensors["model.layers.0.mlp.up_proj.weight+lora.tail"].shape[-1] == 8
    for members in plan.meta["stacks"].values():
        ts = [plan.tensors[m] for m in members]
        for a, b in zip(ts, ts[1:], strict=False):
            assert b.offset == a.offset + a.nbytes, (a.name, b.name)
    assert ["model.layers.0.mlp.gate_proj.weight+lora", "model.layers.0.mlp.up_proj.weight+lora"] in \
        plan.meta["stacks"].values()
    # X lives from its norm to its last GEMM: with recompute the forward's ends in the forward
    x = plan.tensors["L1.attn_norm+lora"]
    end_forward = max(i for i, op in enumerate(plan.ops) if op.phase == "forward")
    assert plan.lifetimes[x.name][1] <= end_forward


@pytest.mark.parametrize("why,over", [
    ("dropout: no stacked down-projection", dict(lora_dropout=0.1)),
    ("fp32 adapters on bf16 activations", dict(torch_dtype="bfloat16", lora_dtype="fp32")),
    ("QLoRA: the base weight is quantized", dict(qlora_bnb=True, qlora_bnb_block_size=64)),
    ("full fine-tune", dict(lora=False)),
])
def test_not_folded_where_the_fold_would_not_be_one_gemm(model_dir, why, over):
    plan = compile_plan(sim_cfg(model_dir, **{**LORA, **over}))
    assert plan.meta.get("lora_folded", 0) == 0, why
    assert not any(op.kind == "lora_fold_tail" or op.attrs.get("lora_fold") for op in plan.ops)


# the cuda table under the simulator takes ~2 min here (-m slow); test_parity_sim's LoRA case runs the folded
# plan on the cuda table against the cpu backend in the default run
@pytest.mark.parametrize("backend,recompute", [("cpu", True), ("cpu", False),
                                               pytest.param("cuda", True, marks=pytest.mark.slow)])
def test_folded_program_computes_what_the_unfolded_one_does(model_dir, monkeypatch, backend, recompute):
    """Loss and every gradient of two steps (the second forward reads tails rewritten from the optimizer's B) and
    the first optimizer update of the folded plan against the unfolded one (fp32 model: equal to fp32 rounding)."""
    cfg = sim_cfg(model_dir, batch=2, **{**LORA, "recompute": recompute})
    folded, plain = compile_plan(cfg), _unfolded(cfg, monkeypatch)
    weights = lora_b_weights(folded)
    runs = [Runner(cfg, backend, plan=p, weights=weights) for p in (folded, plain)]
    copies = record_copies(runs[0]) if backend == "cuda" else []
    for step in range(2):
        ids, labels = batch(2, 8, seed=1 + step)
        (l0, g0), (l1, g1) = (r.micro_step(ids, labels, step=step) for r in runs)
        assert abs(l0 - l1) <= 1e-6 * abs(l1), step
        assert_close_grads(g0, g1, 1e-5)
        before = runs[0].trainable()
        for r in runs:
            r.optimizer_step(step)
        if step == 0:  # (later steps: fp32-rounding differences in the moments can flip an 8-bit code)
            w0, w1 = runs[0].trainable(), runs[1].trainable()
            for n in w1:
                assert not torch.equal(w0[n], before[n]) and rel_err(w0[n] - before[n], w1[n] - before[n]) < 1e-4, n
    folded_outputs = {o for op in folded.ops if op.attrs.get("lora_fold") or op.kind == "lora_fold_tail"
                      for o in op.outputs}
    assert not folded_outputs & set(copies), "a folded GEMM or tail went through a temporary"


@pytest.mark.parametrize("zero_level,folds", [(1, True), (2, False), (3, False)])
def test_data_parallel_plans_stack_and_fold_where_gradients_stay_whole(model_dir, zero_level, folds):
    """Two ranks: ZeRO-1 keeps whole gradients and weights (an all-reduce per gradient, an all-gather per updated
    weight slice, each in place): stacked and folded, the all-reduces after the one GEMM writing the gradients.
    ZeRO-2 (transient gradients, reduce-scattered) and ZeRO-3 (weight shards) keep their per-adapter GEMMs."""
    plan = compile_plan(sim_cfg(model_dir, gpus=2, zero_level=zero_level, **LORA))
    assert (plan.meta["lora_groups"] > 0) == folds and (plan.meta["lora_folded"] > 0) == folds
    at = {op.name: i for i, op in enumerate(plan.ops)}
    for op in plan.ops:
        if op.kind == "linear_stacked_bwd_weight":
            for g in op.outputs:
                reduces = [at[o.name] for o in plan.ops if o.kind == "all_reduce" and g in o.inputs]
                assert reduces and min(reduces) > at[op.name], g


def test_adapters_on_some_projections_fold_beside_a_plain_one(model_dir, monkeypatch):
    """LoRA on q and v only: X = [x | h_q h_v], k's plain base GEMM reads x as a column view of X."""
    cfg = sim_cfg(model_dir, batch=2, lora_target_modules=["q_proj", "v_proj", "gate_proj", "up_proj"],
                  **LORA)
    folded, plain = compile_plan(cfg), _unfolded(cfg, monkeypatch)
    assert folded.meta["lora_folded"] == 4
    k_proj = [op for op in folded.ops if op.inputs[1:2] == ["model.layers.0.self_attn.k_proj.weight"]
              and op.kind == "linear"]
    assert k_proj and all(view_parent(folded.tensors[op.inputs[0]]) for op in k_proj)
    assert folded.tensors["model.layers.0.self_attn.q_proj.weight+lora.tail"].shape[-1] == 8
    weights = lora_b_weights(folded)
    runs = [Runner(cfg, "cpu", plan=p, weights=weights) for p in (folded, plain)]
    ids, labels = batch(2, 8)
    (l0, g0), (l1, g1) = (r.micro_step(ids, labels) for r in runs)
    assert abs(l0 - l1) <= 1e-6 * abs(l1)
    assert_close_grads(g0, g1, 1e-5)


def test_bf16_folded_step_is_within_bf16_rounding_of_the_unfolded_one(model_dir, monkeypatch):
    """A bf16 model with bf16 adapters (the benchmark's job): the folded GEMM rounds base + LoRA once where the
    merge rounds the LoRA product to bf16 first, so the two programs differ by bf16 rounding, not more."""
    # rank 8: bf16 rows of [x | h] stay 16-byte multiples (32 + 3 * 8 columns; rank 4's 44 would not: not folded)
    cfg = sim_cfg(model_dir, batch=2, torch_dtype="bfloat16", lora_dtype="bf16", **{**LORA, "lora_rank": 8})
    assert compile_plan(sim_cfg(model_dir, torch_dtype="bfloat16", lora_dtype="bf16", **LORA)).meta["lora_folded"] == 2
    folded, plain = compile_plan(cfg), _unfolded(cfg, monkeypatch)
    assert folded.meta["lora_folded"] == 4 and plain.meta["lora_folded"] == 0
    weights = {n: w.to(torch.bfloat16) for n, w in lora_b_weights(folded).items()}
    runs = [Runner(cfg, "cpu", plan=p, weights=weights) for p in (folded, plain)]
    ids, labels = batch(2, 8)
    (l0, g0), (l1, g1) = (r.micro_step(ids, labels) for r in runs)
    assert l0 != l1 or any(not torch.equal(g0[n], g1[n]) for n in g0)  # another rounding: not the same bits
    assert abs(l0 - l1) <= 1e-2 * abs(l1)
    for n in g1:
        assert rel_err(g0[n].float(), g1[n].float()) < 5e-2, n


def test_reference_interpreter_runs_the_folded_graph(model_dir):
    """The dict-based interpreter (no arena) gathers X and W+lora from their columns, and W+lora again after the
    tails are rewritten from an updated B: loss and gradients equal the cpu backend's on the arena, both steps."""
    from surogate.runtime.batches import plan_inputs
    from surogate.runtime.reference import load_weights, run_graph
    from surogate.runtime.trainer import loss_tensor

    cfg = sim_cfg(model_dir, batch=2, **LORA)
    plan = compile_plan(cfg)
    weights = lora_b_weights(plan)
    runner = Runner(cfg, "cpu", plan=plan, weights=weights)

    class PlanGraph:  # the plan's micro-step ops, run by the interpreter
        tensors = plan.tensors

        def ops(self):
            return iter(plan.ops[: plan.meta.get("optimizer_start", len(plan.ops))])

    values = {**load_weights(plan, cfg.model, lora_seed=int(cfg.train_seed)), **weights}
    for step in range(2):
        ids, labels = batch(2, 8, seed=3 + step)
        loss, grads = runner.micro_step(ids, labels, step=step)
        b, t = ids.shape
        # activations start afresh; weights stay, W+lora gathered in step 0 among them (stale once the tail is
        # rewritten: the interpreter must gather it again)
        for n in [n for n in values if plan.tensors[n].role.value not in ("frozen_weight", "trainable_weight")]:
            del values[n]
        assert step == 0 or "model.layers.0.self_attn.q_proj.weight+lora" in values
        values.update(plan_inputs(plan, {"input_ids": ids, "labels": labels,
                                         "position_ids": torch.arange(t).expand(b, t),
                                         "cu_seqlens": torch.arange(0, b * t + 1, t)}))
        run_graph(PlanGraph(), values, step=step)
        assert loss == pytest.approx(float(values[loss_tensor(plan)]), rel=1e-6), step
        ours = {t_.attrs["grad_of"]: values[n] for n, t_ in plan.tensors.items()
                if t_.role.value == "gradient" and n in values}
        assert set(ours) == set(grads)
        for name, g in ours.items():
            assert rel_err(grads[name], g) < 1e-5, (step, name)
        runner.optimizer_step(step)
        values.update(runner.trainable())  # the updated adapters: the next forward rewrites the tails from them


def test_switched_off_by_environment(model_dir, monkeypatch):
    monkeypatch.setenv(OFF_ENV, "fold_lora_up_projection")
    plan = compile_plan(sim_cfg(model_dir, **LORA))
    assert plan.meta["lora_folded"] == 0 and plan.meta["lora_groups"] == 4
    assert not any(t.attrs.get("fold") for t in plan.tensors.values())
