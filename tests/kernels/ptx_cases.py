"""Launcher calls covering every kernel variant, used by ptx_check.py (compiled, never executed)."""

from __future__ import annotations

import importlib

import torch

MODULES = ["rmsnorm", "swiglu", "rope", "dropout"]
BF, F32 = torch.bfloat16, torch.float32


def patch_launch(fake) -> None:
    for m in MODULES:
        importlib.import_module(f"surogate.numba_kernels.{m}").launch = fake


def case_rmsnorm():
    from surogate.numba_kernels.rmsnorm import rmsnorm_backward, rmsnorm_forward

    for dt in (F32, BF):
        x, w = torch.zeros(4, 8, dtype=dt), torch.zeros(8, dtype=dt)
        rmsnorm_forward(x, w, x, torch.zeros(4), 1e-6)
        rmsnorm_forward(x, w, x, torch.zeros(4), 1e-6, residual=x, sum_out=x)
        rmsnorm_backward(x, x, w, torch.zeros(4), x, w)
        rmsnorm_backward(x, x, w, torch.zeros(4), x, w, dresidual=x)


def case_swiglu():
    from surogate.numba_kernels.swiglu import swiglu_backward, swiglu_forward

    for dt in (F32, BF):
        gu = torch.zeros(4, 16, dtype=dt)
        g, u = gu[:, :8], gu[:, 8:]
        swiglu_forward(g, u, torch.zeros(4, 8, dtype=dt))
        swiglu_forward(g.contiguous(), u.contiguous(), torch.zeros(4, 8, dtype=dt))
        swiglu_backward(g.contiguous(), g.contiguous(), u.contiguous(), g.contiguous(), u.contiguous())


def case_rope():
    from surogate.numba_kernels.rope import rope_backward, rope_forward, rope_fused_forward

    for dt in (F32, BF):
        for pdt in (torch.int32, torch.int64):
            x, pos = torch.zeros(4, 2, 8, dtype=dt), torch.zeros(4, dtype=pdt)
            cos = torch.zeros(16, 4)
            rope_forward(x, x, pos, cos, cos)
            rope_backward(x, x, pos, cos, cos)
            rope_fused_forward(x, x, pos, torch.zeros(4))
            qkv = torch.zeros(4, 3, 8, dtype=dt)[:, :2]
            rope_forward(qkv, qkv, pos, cos, cos)


def case_dropout():
    from surogate.numba_kernels.dropout import dropout_apply

    for dt in (F32, BF):
        x = torch.zeros(16, dtype=dt)
        dropout_apply(x, x, 0.1, seed=3)
