"""benchmarks/kernel_bandwidth.py: byte accounting, every bench runs (simulator, tiny sizes), clean no-GPU exit."""

from __future__ import annotations

import math

import pytest
import torch

from tests.scripts import load_script


@pytest.fixture(scope="module")
def kb():
    return load_script("benchmarks/kernel_bandwidth.py")


def _by_name(benches):
    return {b.name.split()[0]: b for b in benches}


def test_byte_accounting_closed_forms(kb):
    sz = kb.Sizes()
    b = _by_name(kb.build_benches(sz, "meta"))
    t, h, i, v = sz.tokens, sz.hidden, sz.intermediate, sz.vocab
    # bf16 x, residual read; bf16 out, sum written; bf16 weight read; fp32 rstd written
    assert b["rmsnorm_fwd"].nbytes == 2 * (4 * t * h + h) + 4 * t
    # bf16 dy, s, dresidual read, ds written; weight read, dweight written (rstd recomputed, not read)
    assert b["rmsnorm_bwd"].nbytes == 2 * (4 * t * h + 2 * h)
    assert b["swiglu_fwd"].nbytes == 2 * (2 * t * i + t * i)
    assert b["swiglu_bwd"].nbytes == 2 * (t * i + 2 * t * i + 2 * t * i)
    heads = sz.q_heads + sz.kv_heads
    assert b["rope_fused_fwd"].nbytes == 2 * 2 * t * heads * sz.head_dim + 8 * t + 4 * sz.head_dim // 2
    rows = math.ceil(t / sz.lmhead_chunks)
    assert b["ce_dlogits"].nbytes == 2 * 2 * rows * v + 8 * rows + 4 * rows
    n, nb = sz.optimizer_numel, math.ceil(sz.optimizer_numel / 256)
    # grad bf16 + master fp32 + 2 code bytes read; param bf16 + master fp32 + 2 code bytes written; 4 absmax arrays
    assert b["adamw8bit_step"].nbytes == (2 + 4 + 2) * n + (2 + 4 + 2) * n + 4 * 4 * nb
    nq = i * h
    assert b["nf4_dequantize"].nbytes == nq // 2 + 4 * math.ceil(nq / sz.qlora_block) + 2 * nq


def test_every_bench_runs_on_tiny_sizes(kb):
    sz = kb.Sizes(tokens=6, hidden=16, intermediate=12, vocab=40, q_heads=2, kv_heads=1, head_dim=8,
                  lmhead_chunks=2, optimizer_numel=300, qlora_block=8, fp8_block=8)
    benches = kb.build_benches(sz, "cpu")
    assert len(benches) >= 15
    for bench in benches:
        bench.run()
        for t in bench.writes:
            if t.is_floating_point():
                assert torch.isfinite(t.float()).all(), bench.name


def test_no_gpu_message_and_dry_run(kb, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the script would time kernels")
    assert kb.main([]) == 0
    assert "no CUDA GPU" in capsys.readouterr().out
    assert kb.main(["--dry-run"]) == 0
    assert "adamw8bit_step" in capsys.readouterr().out
