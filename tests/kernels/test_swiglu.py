"""SwiGLU kernels vs reference, and the reference vs HF's MLP activation and autograd."""

from __future__ import annotations

import pytest
import torch

from surogate.numba_kernels.swiglu import (
    swiglu_backward,
    swiglu_backward_ref,
    swiglu_forward,
    swiglu_forward_ref,
)

from .helpers import DTYPES, close


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,cols", [(1, 1), (3, 37), (2, 70)])
def test_forward_backward_match_reference(dtype, rows, cols):
    g = (torch.randn(rows, cols) * 3).to(dtype)
    u = torch.randn(rows, cols).to(dtype)
    out = torch.empty_like(g)
    swiglu_forward(g, u, out)
    close(out, swiglu_forward_ref(g, u), dtype)
    d = torch.randn(rows, cols).to(dtype)
    dg, du = torch.empty_like(g), torch.empty_like(u)
    swiglu_backward(d, g, u, dg, du)
    rg, ru = swiglu_backward_ref(d, g, u)
    close(dg, rg, dtype)
    close(du, ru, dtype)


def test_fused_gate_up_views():
    """gate and up as the two halves of one [rows, 2 * cols] buffer (strided rows)."""
    rows, cols = 4, 19
    gu = torch.randn(rows, 2 * cols)
    out = torch.full((rows, 2 * cols), -7.0)
    swiglu_forward(gu[:, :cols], gu[:, cols:], out[:, cols:])
    close(out[:, cols:], swiglu_forward_ref(gu[:, :cols], gu[:, cols:]))
    assert torch.all(out[:, :cols] == -7.0)  # nothing written outside the view


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_matches_hf_activation_and_autograd(dtype):
    from transformers.activations import ACT2FN

    g = torch.randn(6, 11, dtype=dtype, requires_grad=True)
    u = torch.randn(6, 11, dtype=dtype, requires_grad=True)
    y = ACT2FN["silu"](g) * u  # HF LlamaMLP / Qwen3MLP: act_fn(gate_proj(x)) * up_proj(x)
    assert torch.equal(swiglu_forward_ref(g.detach(), u.detach()), y.detach())
    d = torch.randn_like(y)
    y.backward(d)
    rg, ru = swiglu_backward_ref(d, g.detach(), u.detach())
    close(rg, g.grad, dtype)
    close(ru, u.grad, dtype)
