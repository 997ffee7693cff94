"""benchmarks/roofline.py: the per-op floor model (GEMM FLOPs, attention pairs, traffic) and what it says about
the Qwen3-0.6B LoRA plan, with no GPU."""

from __future__ import annotations

import math

import pytest

from surogate.compiler.pipeline import compile_plan
from surogate.schema import config_from_dict
from tests.scripts import load_script

JOB = {"model": "Qwen/Qwen3-0.6B", "sequence_len": 256, "per_device_train_batch_size": 2, "lora": True,
       "lora_rank": 16, "lora_alpha": 32, "lora_dtype": "bf16", "torch_dtype": "bfloat16", "recompute": True,
       "lora_dropout": 0.0}  # as the throughput job


@pytest.fixture(scope="module")
def rf():
    return load_script("benchmarks/roofline.py")


@pytest.fixture(scope="module")
def plan():
    return compile_plan(config_from_dict(JOB))


def _op(plan, name):
    return plan.ops[plan.op_index(name)]


def test_gemm_costs_are_2mnk_and_one_pass_over_each_tensor(rf, plan):
    rows = 2 * 256
    o = _op(plan, "L3.o")  # a base projection: x [2, 256, 2048] @ W_o [1024, 2048]^T, bf16
    nbytes, flops = rf.op_cost(plan, o)
    assert flops == 2 * rows * 1024 * 2048
    assert nbytes == 2 * (rows * 2048 + 1024 * 2048 + rows * 1024)
    # a folded q projection (fold_lora_up_projection): [x | h_q h_k h_v] [rows, 1024 + 48] @ [W_q | tail]^T
    q = _op(plan, "L3.q.lora_add.fold")
    nbytes, flops = rf.op_cost(plan, q)
    assert flops == 2 * rows * 2048 * 1072
    assert nbytes == 2 * (rows * 1072 + 2048 * 1072 + rows * 2048)
    dw = _op(plan, "L3.q.lora_a.bwd.linear_bwd_weight+3")  # [dA_q; dA_k; dA_v] = dh_G^T [48, rows] @ x [rows, 1024]
    assert rf.op_cost(plan, dw)[1] == 2 * rows * 48 * 1024
    dx = _op(plan, "L3.q.lora_a.bwd.linear_bwd_data+3")  # dx += dh_G [rows, 48] @ [A_q; A_k; A_v]
    assert rf.op_cost(plan, dx)[1] == 2 * rows * 48 * 1024
    acc = next(op for op in plan.ops if op.kind == "linear_bwd_data" and op.attrs.get("accumulate_into"))
    (out,) = acc.outputs
    read_write = rf.op_cost(plan, acc)[0] - sum(plan.tensors[n].nbytes for n in acc.inputs)
    assert read_write == 2 * plan.tensors[out].nbytes  # an accumulated output is read and written


def test_attention_pairs_follow_the_documents(rf, plan):
    assert rf.causal_pairs(16, 8, None) == 2 * 8 * 9 / 2
    assert rf.causal_pairs(0, 1, [3, 5]) == 6 + 15
    att = next(op for op in plan.ops if op.kind == "attention")
    heads_dim = att.attrs["num_heads"] * att.attrs["head_dim"]
    assert rf.op_cost(plan, att)[1] == 4 * heads_dim * rf.causal_pairs(512, 256, None)
    assert rf.op_cost(plan, att, pairs=100.0)[1] == 4 * heads_dim * 100
    bwd = next(op for op in plan.ops if op.kind == "attention_bwd")
    assert rf.op_cost(plan, bwd, pairs=100.0)[1] == 2.5 * 4 * heads_dim * 100
    # the step's documents are spread over its micro-steps
    one = rf.step_floor(plan, rf.Peak.of("h100"), 2, doc_lengths=[256] * 4)["attention"]
    whole = rf.step_floor(plan, rf.Peak.of("h100"), 2)["attention"]
    assert one.flops == whole.flops


def test_the_floor_sees_what_recompute_and_the_fused_loss_cost(rf, plan, monkeypatch):
    peak = rf.Peak.of("h100")
    floor = lambda p: sum(k.seconds for k in rf.step_floor(p, peak, 4).values())  # noqa: E731
    fused = rf.step_floor(plan, peak, 4)["lm_head_ce_fwd_bwd"]
    assert fused.calls == 4 and fused.flops == 4 * 2 * (2 * 512 * 151936 * 1024)  # logits + dX GEMMs
    assert floor(compile_plan(config_from_dict({**JOB, "recompute": False}))) < floor(plan)
    monkeypatch.setenv("SUROGATE_FUSIONS_OFF", "fuse_lm_head_ce")
    pair = rf.step_floor(compile_plan(config_from_dict(JOB)), peak, 4)
    assert pair["lm_head_ce"].flops + pair["lm_head_ce_bwd"].flops == pytest.approx(1.5 * fused.flops)
    assert math.isclose(floor(plan) + 0.5 * fused.flops / peak.flops_16, sum(k.seconds for k in pair.values()),
                        rel_tol=0.05)  # the unfused pair's extra logits GEMM (and logits passes)


def test_cli_prints_the_table_without_a_gpu(rf, capsys):
    assert rf.main(["--seq", "128", "--accum", "2"]) == 0
    out = capsys.readouterr().out
    assert "lm_head_ce_fwd_bwd" in out and "step floor" in out and "of the floor" in out


def test_device_floors_take_the_cards_peaks_and_the_batches_documents(rf, plan, monkeypatch):
    import torch

    # rows of 256 tokens (the plan's sequence), two per micro-batch; the first packs two documents into row 0
    mbs = [{"cu_seqlens": torch.tensor([0, 100, 256, 512])}, {"cu_seqlens": torch.tensor([0, 256, 512])}]
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    got = rf.device_floors(plan, mbs)
    want = rf.step_floor(plan, rf.Peak.of("h200"), 2, doc_lengths=[100, 156, 256, 256, 256])
    assert got["attention"].flops == want["attention"].flops < rf.step_floor(plan, rf.Peak.of("h200"), 2)[
        "attention"].flops  # packed documents attend less than whole rows
    assert got["linear"].seconds == want["linear"].seconds
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA A100-SXM4-80GB")
    assert rf.device_floors(plan, mbs) == {}  # no datasheet peaks for that card: no floor rather than a wrong one
