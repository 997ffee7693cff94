"""The cuda kernel table (torch GEMMs / fused attention + Numba kernels in the simulator) executes a compiled
plan's micro-step and optimizer step like the cpu backend: same loss, gradients and updated weights within
fp32 tolerance. The cpu backend itself matches transformers/peft (tests/runtime/test_parity.py); one case here
checks the cuda table against transformers directly."""

from __future__ import annotations

import pytest
import torch

from tests.cuda_backend.helpers import (
    assert_close_grads,
    batch,
    pair,
    record_copies,
    rel_err,
    save_sim_model,
    sim_cfg,
)

TOL = 1e-5


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_sim_model(tmp_path_factory.mktemp("cuda_sim") / "qwen3")


CASES = {
    "full-b2": dict(batch=2),
    # the optimizer step is the same as full-b2's: skipped here to keep the simulator runs short
    "full-recompute-chunked": dict(recompute=True, lmhead_chunks=2, attn_bwd_chunks=2, optimizer_step=False),
    "lora-recompute-chunked": dict(lora=True, lora_rank=4, lora_alpha=8, recompute=True, lmhead_chunks=2,
                                   attn_bwd_chunks=2),
}


# full-recompute-chunked (~26 s) with -m slow: recompute and chunking run in the LoRA case, full fine-tune in full-b2
SLOW = {"full-recompute-chunked"}


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW else c for c in CASES])
def test_micro_step_and_optimizer_step_match_cpu_backend(model_dir, case):
    over = dict(CASES[case])
    b = over.pop("batch", 1)
    check_optimizer = over.pop("optimizer_step", True)
    ref, cud = pair(sim_cfg(model_dir, batch=b, **over))
    kinds = {op.kind: op.attrs for op in ref.plan.ops}
    copies = record_copies(cud)
    assert kinds["lm_head_ce_fwd_bwd"].get("chunks", 1) == over.get("lmhead_chunks", 1)
    assert any(op.attrs.get("recompute") for op in ref.plan.ops) == over.get("recompute", False)
    ids, labels = batch(b, 8)
    loss0, g0 = ref.micro_step(ids, labels)
    loss1, g1 = cud.micro_step(ids, labels)
    assert abs(loss1 - loss0) <= TOL * abs(loss0), (loss1, loss0)
    assert_close_grads(g1, g0, TOL)
    if over.get("lora"):  # the stacked LoRA GEMMs (group_lora_projections), merges, folded GEMMs and tails
        # (fold_lora_up_projection) and the norms writing x into [x | h] write the plan's views
        assert "linear_stacked" in kinds and "linear_stacked_bwd_weight" in kinds and "lora_fold_tail" in kinds
        direct = {o for op in ref.plan.ops if op.kind.startswith("linear_stacked") or op.attrs.get("lora_fold")
                  or op.kind in ("lora_merge", "lora_fold_tail", "rmsnorm", "add_rmsnorm") for o in op.outputs}
        assert direct and not direct & set(copies), sorted(direct & set(copies))
    if case == "full-b2":  # the cpu backend is the oracle here; check once against transformers directly
        _check_against_transformers(model_dir, ids, labels, loss1, g1)
    if not check_optimizer:
        return
    before = ref.trainable()
    ref.optimizer_step(0)
    cud.optimizer_step(0)
    w0, w1 = ref.trainable(), cud.trainable()
    moved = [n for n in w0 if not torch.equal(w0[n], before[n])]
    assert len(moved) == len(w0), "every trainable weight must move, or the comparison is vacuous"
    for n in w0:
        assert rel_err(w1[n] - before[n], w0[n] - before[n]) < 1e-4, n


def test_packed_row_matches_cpu_backend_and_differs_from_unpacked(model_dir):
    ref, cud = pair(sim_cfg(model_dir, lora=True, lora_rank=4, lora_alpha=8, attn_bwd_chunks=2))
    ids, labels = batch(1, 8, seed=3)
    labels[0, 3] = -100  # the second document's first token is never a target
    packed = dict(position_ids=torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]]), cu_seqlens=torch.tensor([0, 3, 8]))
    loss0, g0 = ref.micro_step(ids, labels, **packed)
    loss1, g1 = cud.micro_step(ids, labels, **packed)
    assert abs(loss1 - loss0) <= TOL * abs(loss0)
    assert_close_grads(g1, g0, TOL)
    joined, _ = ref.micro_step(ids, labels)  # (the cpu backend: the cuda table equals it, one simulator run less)
    assert abs(joined - loss1) > 1e-4  # the document boundary changed the computation


def _check_against_transformers(model_dir, ids, labels, loss, grads):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    assert abs(loss - out.loss.item()) <= TOL * out.loss.item()
    assert_close_grads(grads, {n: p.grad for n, p in model.named_parameters()}, TOL)


def test_bf16_error_is_that_of_the_cpu_backend(model_dir):
    """bf16 (fp32 adapters on bf16 activations, bf16 logits in the plan's workspace): against the fp32 result,
    the cuda table's error is within twice the cpu backend's own bf16 error."""
    from tests.cuda_backend.helpers import Runner, lora_b_weights

    over = dict(lora=True, lora_rank=4, lora_alpha=8, lmhead_chunks=2)
    exact = Runner(sim_cfg(model_dir, **over), "cpu")
    weights = lora_b_weights(exact.plan)
    exact = Runner(sim_cfg(model_dir, **over), "cpu", plan=exact.plan, weights=weights)
    cfg = sim_cfg(model_dir, torch_dtype="bfloat16", **over)
    ref, cud = pair(cfg)
    for r in (ref, cud):
        for n, v in weights.items():
            r.ex.write(n, v.to(r.ex.views[n].dtype))
    ids, labels = batch(1, 8, seed=9)
    l32, g32 = exact.micro_step(ids, labels)
    l0, g0 = ref.micro_step(ids, labels)
    l1, g1 = cud.micro_step(ids, labels)
    assert abs(l1 - l32) <= 2 * abs(l0 - l32) + 1e-3 * l32
    for n, g in g32.items():
        assert rel_err(g1[n], g) <= 2 * rel_err(g0[n], g) + 2e-3, n


@pytest.mark.slow  # ~70 s under the simulator (two full training runs)
def test_training_run_on_the_cuda_table_logs_the_cpu_backends_losses(tmp_path):
    """`run_training(..., backend="cuda")` (the Trainer's loop, packed text data, recompute, chunked LM head and
    attention backward, two optimizer steps) logs the losses of the same run on the cpu backend."""
    from surogate.runtime.session import run_training
    from tests.runtime.helpers import text_cfg, write_text_data
    from tests.runtime_support.helpers import VOCAB as TOKENIZER_VOCAB

    model = save_sim_model(tmp_path / "m", vocab_size=TOKENIZER_VOCAB)
    data = write_text_data(tmp_path / "data.jsonl", rows=8)
    losses = {}
    for backend in ("cpu", "cuda"):
        cfg = text_cfg(model, data, tmp_path / backend, sequence_len=8, per_device_train_batch_size=1,
                       max_steps=2, recompute=True, lmhead_chunks=2, attn_bwd_chunks=2, learning_rate=1e-2,
                       sample_packing=True)
        losses[backend] = run_training(cfg, backend=backend, console_file=open(tmp_path / f"{backend}.txt", "w")).losses
    assert len(losses["cpu"]) == 2 and losses["cpu"][0] != losses["cpu"][1]
    for a, b in zip(losses["cuda"], losses["cpu"], strict=True):
        assert abs(a - b) <= 1e-5 * abs(b), losses


def test_qlora_double_quant_micro_step_matches_cpu_backend(model_dir):
    """QLoRA (NF4 codes packed in the arena, double-quantized absmax): the cuda table's dequant on the device
    gives the cpu backend's loss and adapter gradients."""
    ref, cud = pair(sim_cfg(model_dir, lora=True, lora_rank=4, lora_alpha=8, qlora_bnb=True,
                            qlora_bnb_block_size=64, qlora_bnb_double_quant=True))
    assert any(op.kind == "dequant" and op.attrs.get("double_quant") for op in ref.plan.ops)
    ids, labels = batch(1, 8, seed=8)
    loss0, g0 = ref.micro_step(ids, labels)
    loss1, g1 = cud.micro_step(ids, labels)
    assert abs(loss1 - loss0) <= TOL * abs(loss0)
    assert_close_grads(g1, g0, TOL)
