"""NorMuon element-wise kernels vs reference; the composed step vs a direct transcription of NorMuon."""

from __future__ import annotations

import math

import pytest
import torch

from surogate.numba_kernels.normuon import (
    newton_schulz5_ref,
    normuon_apply,
    normuon_apply_ref,
    normuon_momentum,
    normuon_momentum_ref,
    normuon_normalise,
    normuon_normalise_ref,
)

from .helpers import close


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_momentum_matches_reference(nesterov, dtype):
    g, m = torch.randn(37).to(dtype), torch.randn(37)
    upd = torch.empty(37, dtype=dtype)
    ref_m, ref_u = normuon_momentum_ref(g, m, 0.95, nesterov)
    normuon_momentum(g, m, upd, 0.95, nesterov)
    close(m, ref_m)
    close(upd, ref_u.to(dtype), dtype)


@pytest.mark.parametrize("shape", [(5, 13), (13, 5), (1, 7)])
def test_normalise_matches_reference(shape):
    o = torch.randn(*shape)
    v = torch.rand(shape[0]) * 0.1
    ref_d, ref_v = normuon_normalise_ref(o, v, 0.95)
    rowsq, scale = torch.empty(shape[0]), torch.empty(1)
    normuon_normalise(o, v, rowsq, scale, 0.95)
    close(v, ref_v)
    d = o / (v.sqrt()[:, None] + 1e-10) * scale
    torch.testing.assert_close(d, ref_d, rtol=1e-5, atol=1e-6)
    # the normalisation keeps the Frobenius norm of O (times the aspect factor)
    torch.testing.assert_close(d.norm(), o.norm() * math.sqrt(max(1.0, shape[0] / shape[1])), rtol=1e-5, atol=0)


@pytest.mark.parametrize("cautious", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_matches_reference(cautious, dtype):
    p = torch.randn(6, 11).to(dtype)
    o, v = torch.randn(6, 11), torch.rand(6) + 0.1
    g, m = torch.randn(6, 11), torch.randn(6, 11).to(dtype)
    scale, hp = torch.tensor([1.3]), torch.tensor([0.02, 0.5])
    d = o / (v.sqrt()[:, None] + 1e-10) * scale
    expect = normuon_apply_ref(p, d, 0.02, 0.5, cautious, grad=g, momentum=m)
    normuon_apply(p, o, v, scale, hp, cautious, grad=g, momentum=m)
    close(p, expect, dtype)


def test_cautious_decay_only_where_gradient_and_momentum_align():
    """The contract (`normuon_cautious_wd`): decay only where gradient and momentum align; the update's
    or the weight's sign plays no part (each column below flips one of them)."""
    p = torch.tensor([[1.0, 1.0, -1.0, -1.0, 1.0, 1.0]])
    o = torch.tensor([[1.0, -1.0, 1.0, -1.0, 1.0, 1.0]])
    g = torch.tensor([[1.0, 1.0, -1.0, 1.0, 1.0, 0.0]])
    m = torch.tensor([[1.0, 1.0, -1.0, -1.0, -1.0, 1.0]])
    lr, wd = 0.1, 1.0
    normuon_apply(p, o, torch.ones(1), torch.ones(1), torch.tensor([lr, wd]), cautious=True, grad=g, momentum=m)
    d = o / (1.0 + 1e-10)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0, 0.0, 0.0]])  # hand-written: g*m = 1, 1, 1, -1, -1, 0
    p0 = torch.tensor([[1.0, 1.0, -1.0, -1.0, 1.0, 1.0]])
    close(p, p0 * (1 - lr * wd * mask) - lr * d)


def test_reference_mask_is_the_hand_written_torch_formula():
    g, m, w, d = torch.randn(5, 7), torch.randn(5, 7), torch.randn(5, 7), torch.randn(5, 7)
    out = normuon_apply_ref(w, d, 0.03, 0.2, True, grad=g, momentum=m)
    expect = w * (1 - 0.03 * 0.2 * torch.where(g * m > 0, 1.0, 0.0)) - 0.03 * d
    torch.testing.assert_close(out, expect, rtol=0, atol=1e-7)
    assert not torch.equal(out, normuon_apply_ref(w, d, 0.03, 0.2, False))  # the mask matters here


def test_cautious_without_gradient_and_momentum_is_refused():
    p = torch.randn(2, 3)
    with pytest.raises(ValueError, match="gradient and the momentum"):
        normuon_apply(p, torch.randn(2, 3), torch.ones(2), torch.ones(1), torch.tensor([0.1, 0.1]), cautious=True)


def test_composed_step_matches_transcription():
    """momentum -> Newton-Schulz -> normalise -> apply, kernels vs NorMuon's reference update written out."""
    rows, cols, lr, wd = 8, 12, 0.02, 0.1
    w, g, mom, v = torch.randn(rows, cols), torch.randn(rows, cols), torch.randn(rows, cols) * 0.1, torch.zeros(rows)
    # transcription (normuon_update + step, beta 0.95, beta2 0.95, nesterov, cautious wd)
    m_ref = mom.lerp(g, 0.05)
    u = g.lerp(m_ref, 0.95)
    o = newton_schulz5_ref(u).float()
    vnorm = o.norm()
    v_ref = v.lerp((o * o).mean(dim=-1), 0.05)
    d = o / (v_ref.sqrt()[:, None] + 1e-10)
    d = d * (vnorm / (d.norm() + 1e-10)) * max(1, rows / cols) ** 0.5
    mask = (g * m_ref.to(mom.dtype).float() > 0).float()  # gradient and (stored) momentum align
    w_ref = w * (1 - lr * wd * mask) - lr * d
    # kernels
    upd = torch.empty(rows, cols)
    normuon_momentum(g, mom, upd, 0.95)
    o_k = newton_schulz5_ref(upd).float().contiguous()
    rowsq, scale = torch.empty(rows), torch.empty(1)
    normuon_normalise(o_k, v, rowsq, scale, 0.95)
    normuon_apply(w, o_k, v, scale, torch.tensor([lr, wd]), cautious=True, grad=g, momentum=mom)
    close(mom, m_ref)
    close(v, v_ref)
    torch.testing.assert_close(w, w_ref, rtol=1e-4, atol=1e-4)  # NS runs in bf16 on slightly different inputs
