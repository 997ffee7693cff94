"""LoRA merge kernel (simulator) against its reference: the unfused reference `linear` + `add`, with the roundings."""

from __future__ import annotations

import pytest
import torch

from surogate.numba_kernels.lora_merge import R_MAX, lora_merge, lora_merge_ref
from surogate.runtime.reference.kernels_fwd import add, linear
from surogate.runtime.reference.kernels_fwd import lora_merge as reference_op

BF16, F32 = torch.bfloat16, torch.float32
COMBOS = [(BF16, F32), (BF16, BF16), (F32, F32), (F32, BF16)]  # (model dtype, adapter dtype)


def _args(base_dt, lora_dt, rows=5, cols=40, r=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(rows, cols, generator=g).to(base_dt)
    h = torch.randn(rows, r, generator=g).to(lora_dt)
    b = torch.randn(cols, r, generator=g).to(lora_dt)
    return base, h, b


def _k_order(base, h, b, scale):
    """The kernel's math spelled out: fp32 products summed over k in order, times scale, then the two roundings."""
    acc = torch.zeros(base.shape, dtype=F32)
    for k in range(h.shape[1]):
        acc = acc + h[:, k:k + 1].float() * b[:, k].float()[None, :]
    v = (acc * scale).to(torch.promote_types(h.dtype, b.dtype)).to(base.dtype)
    return base + v


@pytest.mark.parametrize("base_dt,lora_dt", COMBOS)
def test_reference_is_the_unfused_pair_bit_for_bit(base_dt, lora_dt):
    base, h, b = _args(base_dt, lora_dt, rows=7, cols=24, r=16)
    pair = add([base, linear([h, b], {"scale": 0.75}, None)[0]], {}, None)[0]
    out = torch.empty_like(base)
    lora_merge_ref(base, h, b, out, 0.75)
    assert torch.equal(out, pair)
    assert torch.equal(reference_op([base, h, b], {"scale": 0.75}, None)[0], pair)


@pytest.mark.parametrize("base_dt,lora_dt", COMBOS)
def test_kernel_is_the_k_order_math_exactly(base_dt, lora_dt):
    # rows not a multiple of the row tile, columns not a multiple of the block: partial tiles both ways
    base, h, b = _args(base_dt, lora_dt, rows=11, cols=45, r=5)
    out = torch.empty_like(base)
    lora_merge(base, h, b, out, 2.0)
    assert torch.equal(out, _k_order(base, h, b, 2.0))


@pytest.mark.parametrize("base_dt,lora_dt", COMBOS)
def test_kernel_within_one_bf16_ulp_of_the_reference(base_dt, lora_dt):
    base, h, b = _args(base_dt, lora_dt, rows=6, cols=40, r=8, seed=3)
    out, ref = torch.empty_like(base), torch.empty_like(base)
    lora_merge(base, h, b, out, 0.75)  # not a power of two: the product's rounding matters
    lora_merge_ref(base, h, b, ref, 0.75)
    if BF16 in (base_dt, lora_dt):
        # bf16 adapters: the reference rounds h @ B^T, then its product with scale (torch's bf16 matmul), the
        # kernel rounds scale * acc once (cuBLAS's alpha): the products differ by up to 1.5 ulp, then the sum's
        # rounding may go either way: one ulp of the output plus two of the product
        prod = (h.float() @ b.float().t() * 0.75).abs()
        ulp = (ref.float().abs() + 2 * prod) * 2.0 ** -7
        assert ((out.float() - ref.float()).abs() <= ulp + 1e-30).all()
    else:
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_large_rank_reads_global_memory_and_in_place_output():
    base, h, b = _args(BF16, F32, rows=3, cols=33, r=R_MAX + 1)
    expect = _k_order(base, h, b, 0.5)
    lora_merge(base, h, b, base, 0.5)  # out is base: each element is read before it is written
    assert torch.equal(base, expect)


def test_three_d_activations_and_shape_errors():
    base, h, b = _args(BF16, F32, rows=6, cols=36, r=4)
    out = torch.empty_like(base)
    lora_merge(base.view(2, 3, 36), h.view(2, 3, 4), b, out.view(2, 3, 36), 2.0)
    assert torch.equal(out, _k_order(base, h, b, 2.0))
    with pytest.raises(ValueError, match="shapes"):
        lora_merge(base, h, b[:-1], out, 2.0)


# the rank above R_MAX took 88 s on the CI machine under the simulator (-m slow); the register variant stays
@pytest.mark.parametrize("r_max", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_base_and_h_as_column_views_of_stacked_projections(r_max):
    """`group_lora_projections` hands the kernel h = h_G[..., c:c + r] and base = y_G[..., c:c + cols], rows
    strided by the group's width: the result is the contiguous tensors' exactly, at the register rank and at a
    rank above R_MAX (global reads)."""
    r = R_MAX + 1 if r_max else 4
    base, h, b = _args(BF16, BF16, rows=6, cols=36, r=r, seed=5)
    wide = torch.randn(2, 3, 3 * r).to(BF16)
    wide[..., r : 2 * r] = h.view(2, 3, r)
    col = wide[..., r : 2 * r]
    assert not col.is_contiguous()
    out = torch.empty_like(base)
    lora_merge(base.view(2, 3, 36), col, b, out.view(2, 3, 36), 2.0)
    assert torch.equal(out, _k_order(base, h, b, 2.0))
    # base as a column view too (the stacked base projections' output y_G [.., q + k + v])
    wide_base = torch.randn(2, 3, 3 * 36).to(BF16)
    wide_base[..., 72:] = base.view(2, 3, 36)
    out2 = torch.empty_like(base)
    lora_merge(wide_base[..., 72:], col, b, out2.view(2, 3, 36), 2.0)
    assert torch.equal(out2, out)
    with pytest.raises(ValueError, match="unit stride"):
        lora_merge(base, wide.view(6, 3 * r)[:, ::3], b, out, 2.0)
