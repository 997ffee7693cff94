"""RMSNorm kernels vs reference, and the reference vs transformers' Qwen3RMSNorm / LlamaRMSNorm."""

from __future__ import annotations

import pytest
import torch

from surogate.numba_kernels.rmsnorm import (
    rmsnorm_backward,
    rmsnorm_backward_ref,
    rmsnorm_forward,
    rmsnorm_forward_ref,
)

from .helpers import DTYPES, close


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,hidden", [(1, 8), (7, 37), (5, 64)])
def test_forward_matches_reference(dtype, rows, hidden):
    x = torch.randn(rows, hidden).to(dtype)
    w = (torch.rand(hidden) + 0.5).to(dtype)
    out, rstd = torch.empty_like(x), torch.empty(rows)
    rmsnorm_forward(x, w, out, rstd, 1e-6)
    ref_out, ref_rstd, _ = rmsnorm_forward_ref(x, w, 1e-6)
    torch.testing.assert_close(rstd, ref_rstd, rtol=1e-6, atol=1e-6)
    close(out, ref_out, dtype)
    if dtype == torch.bfloat16:
        # one rounding per value from identical fp32 math: at most one bf16 ulp apart, mostly identical
        assert (out != ref_out).float().mean() < 0.02


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_residual_forward(dtype):
    rows, hidden = 6, 45
    x, res = torch.randn(rows, hidden).to(dtype), torch.randn(rows, hidden).to(dtype)
    w = torch.randn(hidden).to(dtype)
    out, rstd, summed = torch.empty_like(x), torch.empty(rows), torch.empty_like(x)
    rmsnorm_forward(x, w, out, rstd, 1e-5, residual=res, sum_out=summed)
    ref_out, ref_rstd, ref_sum = rmsnorm_forward_ref(x, w, 1e-5, residual=res)
    assert torch.equal(summed, ref_sum)  # the residual add is one rounding of an exact sum
    torch.testing.assert_close(rstd, ref_rstd, rtol=1e-6, atol=1e-6)
    close(out, ref_out, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_dres", [False, True])
def test_backward_matches_reference(dtype, with_dres):
    rows, hidden = 9, 33  # rows > simulator grid cap: blocks loop over rows and sum partials
    s = torch.randn(rows, hidden).to(dtype)
    w = torch.randn(hidden).to(dtype)
    dy = torch.randn(rows, hidden).to(dtype)
    dres = torch.randn(rows, hidden).to(dtype) if with_dres else None
    _, rstd, _ = rmsnorm_forward_ref(s, w, 1e-6)
    ds, dw = torch.empty_like(s), torch.empty_like(w)
    rmsnorm_backward(dy, s, w, rstd, ds, dw, dresidual=dres)
    ref_ds, ref_dw = rmsnorm_backward_ref(dy, s, w, rstd, dresidual=dres)
    close(ds, ref_ds, dtype)
    close(dw, ref_dw, dtype)


def test_backward_workspace_is_used_and_checked():
    s, dy = torch.randn(3, 16), torch.randn(3, 16)
    w = torch.randn(16)
    _, rstd, _ = rmsnorm_forward_ref(s, w, 1e-6)
    ds, dw = torch.empty_like(s), torch.empty_like(w)
    ws = torch.full((2, 16), float("nan"))  # stale contents must not leak into dweight
    rmsnorm_backward(dy, s, w, rstd, ds, dw, workspace=ws)
    close(dw, rmsnorm_backward_ref(dy, s, w, rstd)[1])
    with pytest.raises(ValueError, match="workspace"):
        rmsnorm_backward(dy, s, w, rstd, ds, dw, workspace=torch.zeros(2, 15))


@pytest.mark.parametrize("cls_name", ["Qwen3RMSNorm", "LlamaRMSNorm"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_matches_transformers(cls_name, dtype):
    import importlib

    family = cls_name.removesuffix("RMSNorm").lower()
    cls = getattr(importlib.import_module(f"transformers.models.{family}.modeling_{family}"), cls_name)
    hidden = 48
    mod = cls(hidden, eps=1e-6).to(dtype)
    with torch.no_grad():
        mod.weight.copy_(torch.randn(hidden))
    x = torch.randn(2, 5, hidden, dtype=dtype, requires_grad=True)
    y = mod(x)
    out, rstd, _ = rmsnorm_forward_ref(x.detach(), mod.weight.detach(), 1e-6)
    assert torch.equal(out, y.detach())  # same ops in the same order: bit-identical
    dy = torch.randn_like(y)
    y.backward(dy)
    ds, dw = rmsnorm_backward_ref(dy, x.detach(), mod.weight.detach(), rstd)
    close(ds, x.grad, dtype)
    # HF's weight gradient multiplies dy by the bf16-rounded normalised value: a bf16-level difference
    close(dw, mod.weight.grad, dtype)
