"""The fused loss op (`lm_head_ce_fwd_bwd`, pass fuse_lm_head_ce) on both kernel tables: the unfused pair's loss
and gradients bit for bit (the cuda table's fused CE kernel against its stats + finalize + gradient kernels under
the simulator); evaluation runs it forward only and writes no gradient."""

from __future__ import annotations

import pytest
import torch

from surogate.compiler.pipeline import compile_plan
from surogate.runtime.executor import StepContext
from surogate.runtime.trainer import eval_program
from tests.cuda_backend.helpers import Runner, batch, lora_b_weights, save_sim_model, sim_cfg

CASES = {
    "lora-chunked": dict(lora=True, lora_rank=4, lora_alpha=8, lmhead_chunks=2),
    "full-tied": dict(recompute=True),  # the tied embedding gets the fused op's weight gradient
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_sim_model(tmp_path_factory.mktemp("loss_fusion") / "qwen3", tie=True)


def _plans(cfg, monkeypatch):
    fused = compile_plan(cfg)
    monkeypatch.setenv("SUROGATE_FUSIONS_OFF", "fuse_lm_head_ce")
    unfused = compile_plan(cfg)
    monkeypatch.delenv("SUROGATE_FUSIONS_OFF")
    kinds = lambda p: [op.kind for op in p.ops if op.kind.startswith("lm_head")]  # noqa: E731
    assert kinds(fused) == ["lm_head_ce_fwd_bwd"] and kinds(unfused) == ["lm_head_ce", "lm_head_ce_bwd"]
    return fused, unfused


def _through_the_loss(runner, kind, ids, labels, loss_weights=None):
    """Run the plan's program up to and including its op `kind` (the loss's backward or the fused op): the
    loss and the gradient the loss sends into the model, without the rest of the backward."""
    ops = runner.plan.ops
    last = next(i for i, op in enumerate(ops) if op.kind == kind)
    runner.ex.programs["head"] = ops[: last + 1]
    runner.write_batch(ids, labels, loss_weights=loss_weights)
    runner.ex.run("head", StepContext(runner.plan, 0))
    dx = runner.ex.views[ops[last].outputs[2 if kind == "lm_head_ce_fwd_bwd" else 0]]
    return float(runner.ex.observed[runner.loss_name]), dx.clone()


@pytest.mark.parametrize("case", list(CASES))
def test_fused_loss_equals_the_pair_bit_for_bit_on_the_cpu_backend(model_dir, monkeypatch, case):
    cfg = sim_cfg(model_dir, batch=2, **CASES[case])
    fused, unfused = _plans(cfg, monkeypatch)
    weights = lora_b_weights(fused)
    ids, labels = batch(2, 8, seed=4)
    l0, g0 = Runner(cfg, "cpu", plan=unfused, weights=weights).micro_step(ids, labels)
    l1, g1 = Runner(cfg, "cpu", plan=fused, weights=weights).micro_step(ids, labels)
    assert l1 == l0 and set(g1) == set(g0)
    assert all(g0[n].abs().sum() > 0 for n in g0)  # every gradient flows (the comparison is not vacuous)
    for n in g0:
        assert torch.equal(g1[n], g0[n]), n
    if case == "full-tied":
        assert "model.embed_tokens.weight" in g1  # written by the fused op, then added to by the embedding's


def test_fused_ce_kernel_equals_the_pairs_kernels_on_the_cuda_table(model_dir, monkeypatch):
    """Under the simulator, the fused op's one kernel per row chunk gives the loss and the gradient into the
    model of the pair's stats + finalize + gradient kernels, bit for bit (two row chunks; the rest of the
    backward is the same program and runs in test_parity_sim.py against the cpu backend)."""
    cfg = sim_cfg(model_dir, **CASES["lora-chunked"])
    fused, unfused = _plans(cfg, monkeypatch)
    ids, labels = batch(1, 8, seed=4)
    l0, dx0 = _through_the_loss(Runner(cfg, "cuda", plan=unfused), "lm_head_ce_bwd", ids, labels)
    l1, dx1 = _through_the_loss(Runner(cfg, "cuda", plan=fused), "lm_head_ce_fwd_bwd", ids, labels)
    assert l1 == l0 and dx0.abs().sum() > 0 and torch.equal(dx1, dx0)


def _eval_loss(runner, ids, labels) -> float:
    runner.ex.programs["eval"] = eval_program(runner.plan)
    runner.write_batch(ids, labels)
    runner.ex.run("eval", StepContext(runner.plan, 0))
    return float(runner.ex.observed[runner.loss_name])


def test_evaluation_runs_the_fused_loss_forward_only_on_the_cuda_table(model_dir):
    """Eval ops keep their training op's attrs (the cuda backend binds outputs by them): with LoRA dropout in
    training (off in eval: an identity) the loss is the cpu backend's evaluation, and no gradient is written."""
    cfg = sim_cfg(model_dir, lora=True, lora_rank=4, lora_alpha=8, lora_dropout=0.5)
    plan = compile_plan(cfg)
    weights = lora_b_weights(plan)
    cud, ref = Runner(cfg, "cuda", plan=plan, weights=weights), Runner(cfg, "cpu", plan=plan, weights=weights)
    ids, labels = batch(1, 8, seed=5)
    train_loss, _ = ref.micro_step(ids, labels, step=1)
    (op,) = [o for o in plan.ops if o.kind == "lm_head_ce_fwd_bwd"]
    dx = cud.ex.views[op.outputs[2]]
    dx.fill_(7.0)
    loss = _eval_loss(cud, ids, labels)
    assert torch.all(dx == 7.0)  # forward only: the gradient output is left alone
    assert abs(loss - _eval_loss(ref, ids, labels)) <= 1e-5 * loss
    assert abs(loss - train_loss) > 1e-4  # training dropped adapter inputs, evaluation did not


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "pair"])
def test_weighted_loss_on_the_cuda_table_equals_the_cpu_table(model_dir, monkeypatch, fused):
    """A custom loss_scale's per-token weights: the cuda table's CE kernels (weights applied to each row's loss
    and logits gradient) against the reference, through the loss (two row chunks)."""
    cfg = sim_cfg(model_dir, lora=True, lora_rank=4, lora_alpha=8, lmhead_chunks=2,
                  loss_scale='{"prompt": 0.5, "last_round": 2.0}')
    plan, pair = _plans(cfg, monkeypatch)
    plan = plan if fused else pair
    kind = "lm_head_ce_fwd_bwd" if fused else "lm_head_ce_bwd"
    ids, labels = batch(1, 8, seed=4)
    w = torch.rand(labels.shape, generator=torch.Generator().manual_seed(2)) * 2.0
    weights = lora_b_weights(plan)
    l0, dx0 = _through_the_loss(Runner(cfg, "cpu", plan=plan, weights=weights), kind, ids, labels, w)
    l1, dx1 = _through_the_loss(Runner(cfg, "cuda", plan=plan, weights=weights), kind, ids, labels, w)
    lu, dxu = _through_the_loss(Runner(cfg, "cpu", plan=plan, weights=weights), kind, ids, labels, w * 0 + 1)
    assert abs(l1 - l0) <= 1e-5 * abs(l0) and abs(lu - l0) > 1e-4  # the weights reached the loss
    assert (dx1 - dx0).abs().max() <= 1e-4 * dx0.abs().max() and not torch.allclose(dxu, dx0)
