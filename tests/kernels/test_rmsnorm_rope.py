"""The q/k norm with the rotation as its epilogue (rmsnorm.rmsnorm_rope_forward) and its backward with the inverse
rotation as the prologue (rmsnorm_rope_backward) against the pairs of kernels they replace (bit for bit) and the
references."""

from __future__ import annotations

import pytest
import torch

from surogate.numba_kernels import _rmsnorm_kernels as K
from surogate.numba_kernels import rope as R
from surogate.numba_kernels.rmsnorm import (
    rmsnorm_backward,
    rmsnorm_forward,
    rmsnorm_rope_backward,
    rmsnorm_rope_backward_ref,
    rmsnorm_rope_forward,
    rmsnorm_rope_ref,
    row_threads,
)
from surogate.numba_kernels.rope import rope_backward, rope_forward, rope_tables_ref

from .helpers import close


def _case(tokens: int, heads: int, d: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(tokens, heads, d, generator=g) * 3).to(dtype)
    w = (torch.rand(d, generator=g) + 0.5).to(dtype)
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    cos, sin = rope_tables_ref(inv, 64)
    pos = torch.tensor([0, 1, 2, 0, 1, 5, 63, 7][:tokens], dtype=torch.int64)  # packed: positions restart
    return x, w, pos, cos, sin


def _pair(x, w, pos, cos, sin):
    out, rstd = torch.empty_like(x), torch.empty(x.shape[0] * x.shape[1])
    rmsnorm_forward(x.reshape(-1, x.shape[-1]), w, out.reshape(-1, x.shape[-1]), rstd, 1e-6)
    rope_forward(out, out, pos, cos, sin)
    return out, rstd


FITS = [
    (torch.bfloat16, 128, True),  # Qwen3's head: int32 pairs, partner halves in one thread
    (torch.float32, 64, True),  # one value per access
    (torch.bfloat16, 64, False),  # 32 pairs per row: halves in different lanes -> the pair of kernels
    (torch.float32, 24, False),
]


@pytest.mark.parametrize("dtype,d,fused", FITS)
def test_fused_equals_the_pair_of_kernels_bit_for_bit(dtype, d, fused, monkeypatch):
    x, w, pos, cos, sin = _case(5, 3, d, dtype)
    lay = K.layout(d, dtype == torch.bfloat16, row_threads(d))
    assert K.rope_fits(lay) == fused
    want, want_rstd = _pair(x, w, pos, cos, sin)
    if fused:  # the one-pass path must not fall back to the rope kernel
        monkeypatch.setattr(R, "rope_forward", lambda *a: pytest.fail("fell back to the pair"))
    out, rstd = torch.empty_like(x), torch.empty(x.shape[0] * x.shape[1])
    rmsnorm_rope_forward(x, w, out, rstd, 1e-6, pos, cos, sin)
    assert torch.equal(out, want)
    assert torch.equal(rstd, want_rstd)
    close(out, rmsnorm_rope_ref(x, w, 1e-6, pos, cos, sin), dtype)


def test_rope_epilogue_needs_partner_halves_in_one_thread():
    with pytest.raises(ValueError, match="partner halves"):
        K.fwd_kernel(torch.bfloat16, torch.bfloat16, torch.bfloat16, False, K.layout(64, True, 128), True)



@pytest.mark.parametrize("dtype,d,fused", FITS)
def test_backward_equals_the_pair_of_kernels_bit_for_bit(dtype, d, fused, monkeypatch):
    x, w, pos, cos, sin = _case(5, 3, d, dtype)
    dout = (torch.randn(5, 3, d, generator=torch.Generator().manual_seed(9))).to(dtype)
    dn, want_dx, want_dw = torch.empty_like(x), torch.empty_like(x), torch.empty_like(w)
    rope_backward(dout, dn, pos, cos, sin)
    rmsnorm_backward(dn, x, w, None, want_dx, want_dw, eps=1e-6)
    if fused:
        monkeypatch.setattr(R, "rope_backward", lambda *a: pytest.fail("fell back to the pair"))
    dx, dw = torch.empty_like(x), torch.empty_like(w)
    rmsnorm_rope_backward(dout, x, w, dx, dw, None, 1e-6, pos, cos, sin)
    assert torch.equal(dx, want_dx)
    assert torch.equal(dw, want_dw)
    ref_dx, ref_dw = rmsnorm_rope_backward_ref(dout, x, w, 1e-6, pos, cos, sin)
    close(dx, ref_dx, dtype)
    torch.testing.assert_close(dw.float(), ref_dw.float(), rtol=2e-2, atol=2e-2)


def test_rope_prologue_needs_partner_halves_and_its_own_rstd():
    with pytest.raises(ValueError, match="partner halves"):
        K.bwd_kernel(torch.float32, torch.float32, torch.float32, False, K.layout(128, False, 128), False, True)


@pytest.mark.parametrize("dtype,d,fused", FITS[:1] + FITS[2:3])
def test_a_frozen_weight_skips_the_dweight_work(dtype, d, fused):
    """dweight None: the same dx, and the partials workspace is never written (no sums, no column-sum launch)."""
    x, w, pos, cos, sin = _case(4, 2, d, dtype)
    dout = torch.randn(4, 2, d, generator=torch.Generator().manual_seed(2)).to(dtype)
    want, dw = torch.empty_like(x), torch.empty_like(w)
    ws = torch.zeros(64, d)
    rmsnorm_rope_backward(dout, x, w, want, dw, ws, 1e-6, pos, cos, sin)
    assert ws.abs().sum() > 0  # with a dweight the partials are written
    ws.fill_(float("nan"))
    dx = torch.empty_like(x)
    rmsnorm_rope_backward(dout, x, w, dx, None, ws, 1e-6, pos, cos, sin)
    assert torch.equal(dx, want) and ws.isnan().all()
    ds, ds_ref = torch.empty_like(x), torch.empty_like(x)
    rmsnorm_backward(dout, x, w, None, ds_ref, torch.empty_like(w), workspace=torch.zeros(64, d), eps=1e-6)
    rmsnorm_backward(dout, x, w, None, ds, None, workspace=ws, eps=1e-6)
    assert torch.equal(ds, ds_ref) and ws.isnan().all()
