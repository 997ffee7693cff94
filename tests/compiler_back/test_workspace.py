"""The `workspace` pass: the cuda backend's device bytes beside the arena, in the plan's memory report, the
`surogate plan` table and the fit verdict. (That its figures are what the kernels really allocate is checked by
running the kernel table under the simulator: tests/cuda_backend/test_workspace_sim.py.)"""

from __future__ import annotations

import inspect

import pytest

from surogate.compiler.passes.workspace import estimate_workspace, scratch_specs
from surogate.compiler.pipeline import PASS_NAMES, compile_plan
from surogate.compiler.report import build_report, memory_table_text, reserve_bytes
from surogate.runtime.backends import cuda_sizes as sz
from surogate.schema import config_from_dict

# the throughput benchmark's job (benchmarks/_gpu_job.py): Qwen3-0.6B, bf16, LoRA r16 on all seven projections
JOB = {"model": "Qwen/Qwen3-0.6B", "sequence_len": 2048, "per_device_train_batch_size": 2,
       "gradient_accumulation_steps": 4, "torch_dtype": "bfloat16", "lora": True, "lora_rank": 16, "lora_alpha": 32,
       "lora_dropout": 0.0, "optimizer": "adamw_8bit", "learning_rate": 1e-4}


def estimate_scratch(plan) -> list:
    return list(scratch_specs(plan, sz.Target()))


@pytest.fixture(scope="module")
def plan():
    return compile_plan(config_from_dict(JOB))


def test_pass_runs_last_and_the_report_adds_a_separate_total(plan):
    assert PASS_NAMES[-1] == "workspace" and PASS_NAMES[-2] == "buffers"
    dev = plan.memory["device"]
    ws = dev["backend_workspace"]
    assert dev["peak_bytes"] == plan.arenas["device"]  # the arena keeps its meaning
    assert dev["total_peak_bytes"] == dev["peak_bytes"] + ws["bytes"]
    parts = (ws["persistent_bytes"] + ws["constants_bytes"] + ws["scalars_bytes"] + ws["transient_bytes"]
             + ws["cublas_workspace_bytes"])
    assert parts <= ws["bytes"] <= parts + 512 * (ws["persistent_buffers"] + 64)  # allocator blocks of 512 B
    assert ws["not_sized"] == []


def test_benchmark_job_figures(plan):
    ws = plan.memory["device"]["backend_workspace"]
    rows, hidden = 2 * 2048, 1024
    # fp32 adapters on a GPU: bf16x3 split GEMMs, no fp32 copy of the shared bf16 input (its upcast slot)
    assert "upcast" not in ws["by_tag"]
    r = 16
    # bf16 parts of an fp32 weight, split once per program run: one buffer per adapter weight (A [r, in], B^T
    # [r, out]), 3 x 2 bytes per fp32 element; the shared split scratch only for the fp32 activation lora_a's
    # output, [3r, tokens], in the B weight gradients
    adapters = [t for t in plan.tensors.values() if t.role.value == "trainable_weight"]
    assert len(adapters) == 28 * 7 * 2 and all(t.dtype == "fp32" for t in adapters)
    cached = [s for s in estimate_scratch(plan) if s.tag.startswith(f"{sz.SPLIT_CACHE_TAG}:")]
    # (an up-projection's buffer holds B^T's parts: `name^T`)
    assert sorted(s.tag.split(":", 1)[1].removesuffix("^T") for s in cached) == sorted(t.name for t in adapters)
    assert ws["by_tag"][sz.SPLIT_CACHE_TAG] == 6 * sum(t.numel for t in adapters)  # 60.6 MB at 0.6B
    assert ws["by_tag"]["split_parts"] == 3 * r * rows * 2
    # the largest fp32 product: [tokens, 3r] (lora_a's forward, lora_b's data gradient)
    assert max(s.nbytes for s in estimate_scratch(plan) if s.tag == "split_prod") == rows * 3 * r * 4
    # without them (SUROGATE_SPLIT_GEMM=0, or a device without mm out_dtype) q/k/v and gate/up read the same
    # [rows, hidden] bf16 activation in fp32: one shared slot
    promoted = estimate_workspace(plan, sz.Target(bf16x3=False))
    assert promoted["by_tag"]["upcast"] == rows * hidden * 4 and "split_parts" not in promoted["by_tag"]
    assert ws["by_tag"]["attn_lse_native"] == 16 * rows * 4  # flash path: LSE in [heads, tokens]
    assert "attn_bias" not in ws["by_tag"]  # the SDPA path's mask is not built on a GPU
    assert ws["cublas_workspace_bytes"] == 32 * 2**20  # torch's default on SM90
    # flash attention's backward: whole kv groups per call, as many as the plan's fp32 workspace and occupancy allow
    bwd = next(op for op in plan.ops if op.kind == "attention_bwd")
    budget = plan.tensors[bwd.outputs[-1]].nbytes
    chunks = sz.flash_bwd_chunks(rows, sz.MIN_DOC_SLOTS, 16, 8, 128, budget, int(bwd.attrs.get("chunks", 1)))
    groups = max(g1 - g0 for g0, g1 in sz.chunks(8, chunks))
    assert ws["transient_by_kind"]["attention_bwd"] == groups * sz.flash_bwd_bytes_per_group(rows, 16, 2, 128)
    # flash forward: only the LSE and rng state when torch writes the output into the plan's view, else the output too
    lse_rng = 16 * rows * 4 + 16
    want = lse_rng + (0 if sz.flash_inplace() else rows * 16 * 128 * 2)
    assert ws["transient_by_kind"]["attention"] == want
    assert sz.flash_fwd_bytes(rows, 16, 128, 2, inplace=False) == lse_rng + rows * 16 * 128 * 2
    assert sz.flash_fwd_bytes(rows, 16, 128, 2, inplace=True) == lse_rng
    # the largest temporary of the job, and the whole workspace: small against the arena, not negligible
    assert ws["transient_bytes"] == max(ws["transient_by_kind"].values())
    assert 0.01 < ws["bytes"] / plan.memory["device"]["peak_bytes"] < 0.1


def test_targets_choose_the_attention_path(plan, monkeypatch):
    sim = estimate_workspace(plan, sz.Target(cuda=False, simulator=True))
    assert {"attn_bias", "attn_doc", "attn_same", "attn_k", "attn_v", "attn_kc", "attn_vc"} <= set(sim["by_tag"])
    assert "attn_lse_pad" not in sim["by_tag"] and sim["cublas_workspace_bytes"] == 0
    # fewer resident blocks on the simulator: a smaller RMSNorm partials workspace
    gpu = plan.memory["device"]["backend_workspace"]
    assert sim["by_tag"]["rms_ws"] < gpu["by_tag"]["rms_ws"]
    monkeypatch.setenv("SUROGATE_CUDA_ATTENTION", "sdpa")
    sdpa = estimate_workspace(plan)
    assert "attn_lse_pad" in sdpa["by_tag"] and "attn_lse_native" not in sdpa["by_tag"]
    b, t = 2, 2048
    assert sdpa["by_tag"]["attn_bias"] == b * t * t * 2  # [B, 1, T, T] bf16 mask: the reason flash is preferred
    assert sdpa["bytes"] > gpu["bytes"]


def test_gemm_temporaries_and_cublas_workspace():
    assert sz.gemm_transient((4096, 1024), "bf16", (1024, 16), "bf16", "bf16") == 0
    # bf16 activations into an fp32 adapter, bf16 output: blocks of 2730 rows (2 alive), x and product in fp32
    step = (1 << 23) // 3072
    assert sz.gemm_transient((4096, 16), "bf16", (16, 3072), "fp32", "bf16") == 2 * step * 16 * 4 + 2 * step * 3072 * 4
    # one block: a bf16 product cast into an fp32 output; a bf16 b converted for an fp32 GEMM into its fp32 output
    assert sz.gemm_transient((8, 4), "bf16", (4, 4), "bf16", "fp32") == 8 * 4 * 2
    assert sz.gemm_transient((8, 4), "fp32", (4, 4), "bf16", "fp32") == 4 * 4 * 4
    assert sz.cublas_workspace((9, 0), "") == 32 * 2**20
    assert sz.cublas_workspace((8, 0), "") == 4096 * 1024 * 2 + 16 * 1024 * 8
    assert sz.cublas_workspace((9, 0), ":1024:2") == 2 * 2**20
    assert sz.promote("bf16", "fp16") == "fp32" and sz.promote("bf16", "fp32") == "fp32"


def test_fit_verdict_counts_the_workspace(plan):
    dev = plan.memory["device"]

    def capacity_for(need: int) -> int:  # the smallest GPU whose usable memory holds `need`
        lo, hi = need, 2 * need + 2**31
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (mid + 1, hi) if mid - reserve_bytes(mid) < need else (lo, mid)
        return lo

    assert build_report(plan, gpu_memory=capacity_for(dev["total_peak_bytes"]))["fits"] is True
    # room for the arena but not for the backend's buffers beside it: does not fit
    assert build_report(plan, gpu_memory=capacity_for(dev["peak_bytes"]))["fits"] is False
    rep = build_report(plan)
    assert rep["memory"]["device"]["backend_workspace"]["bytes"] > 0  # in `surogate plan --json`


def test_memory_table_shows_the_workspace(plan):
    text = memory_table_text(plan, width=140)
    for row in ("backend scratch (persistent)", "backend temporaries (at attention_bwd)", "cuBLAS workspace",
                "device total (arena + backend)"):
        assert row in text


def test_kernels_allocate_scratch_only_through_the_shared_sizes():
    """The estimate and the kernels share `cuda_sizes`: a kernel sizing a buffer by itself would drift."""
    from surogate.runtime.backends import cuda_attention, cuda_gemm, cuda_numba, cuda_optim

    for module in (cuda_attention, cuda_gemm, cuda_numba, cuda_optim):
        src = inspect.getsource(module)
        assert "st.scratch(" not in src and "st.alloc(" in src, module.__name__
    assert cuda_attention.flash_bwd_chunks is sz.flash_bwd_chunks


def test_qlora_dequant_counts_the_unpacked_codes():
    plan = compile_plan(config_from_dict({**JOB, "sequence_len": 256, "qlora_bnb": True}))
    ws = plan.memory["device"]["backend_workspace"]
    dq = next(op for op in plan.ops if op.kind == "dequant" and plan.tensors[op.inputs[0]].dtype == "nf4")
    codes = plan.tensors[dq.inputs[0]].numel
    biggest = max(plan.tensors[op.inputs[0]].numel for op in plan.ops
                  if op.kind == "dequant" and plan.tensors[op.inputs[0]].dtype == "nf4")
    # the executor unpacks 4-bit codes to one byte each for the kernel (2 bytes per code at once while it does)
    assert ws["transient_by_kind"]["dequant"] == 2 * biggest >= 2 * codes
    assert ws["not_sized"] == [] and "dequant" in {op.kind for op in plan.ops}


def test_flash_inplace_follows_torch_and_the_switch(monkeypatch):
    import torch

    assert sz.flash_inplace() == hasattr(torch.ops.aten, "_flash_attention_forward_no_dropout_inplace")
    monkeypatch.setenv("SUROGATE_FLASH_INPLACE", "0")
    assert not sz.flash_inplace()


def test_flash_bwd_waves_switch_junk_names_the_variable(monkeypatch):
    from surogate.errors import UserError

    monkeypatch.setenv("SUROGATE_FLASH_BWD_WAVES", "two")
    with pytest.raises(UserError, match=r"SUROGATE_FLASH_BWD_WAVES='two': expected an integer"):
        sz.flash_bwd_chunks(4096, 16, 16, 8, 128, 1 << 20, 1)
    monkeypatch.setenv("SUROGATE_FLASH_BWD_WAVES", "0")  # memory only: as many chunks as the budget needs
    assert sz.flash_bwd_chunks(4096, 16, 16, 8, 128, 1, 1) == 8
