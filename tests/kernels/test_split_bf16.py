"""bf16x3 split and slice-sum kernels (numba_kernels/split_bf16.py) vs their references, and the references'
defining properties: the parts reproduce fp32, non-finite values stay in hi, the sum adds smallest first."""

from __future__ import annotations

import pytest
import torch

from surogate.numba_kernels.split_bf16 import split3, split3_ref, sum3, sum3_ref


def _parts(shape):
    p = torch.empty(3, *shape, dtype=torch.bfloat16)
    return p[0], p[1], p[2]


def test_parts_reproduce_fp32_to_2_pow_minus_24():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(64, 48, generator=g) * torch.logspace(-6, 6, 48)
    lo, mid, hi = _parts(f.shape)
    split3_ref(f, lo, mid, hi)
    back = (lo.double() + mid.double()) + hi.double()
    rel = ((back - f.double()).abs() / f.double().abs()).max().item()
    assert rel <= 2.0**-24, rel
    only_hi = ((hi.double() - f.double()).abs() / f.double().abs()).max().item()
    assert only_hi > 2.0**-10  # bf16 alone is far coarser: the parts matter


def test_non_finite_values_stay_in_hi():
    f = torch.tensor([[float("inf"), -float("inf"), float("nan"), 3.4e38, 0.0, -0.0]])
    lo, mid, hi = _parts(f.shape)
    split3_ref(f, lo, mid, hi)
    assert torch.isinf(hi[0, :2]).all() and torch.isnan(hi[0, 2]) and torch.isinf(hi[0, 3])
    assert (mid == 0).all() and (lo == 0).all()  # no inf - inf in the product


@pytest.mark.parametrize("transposed", [False, True])
def test_split_kernel_matches_reference_bitwise(transposed):
    g = torch.Generator().manual_seed(1)
    f = torch.randn(7, 5, generator=g) * 1e3
    f[1, 2], f[3, 0], f[6, 4] = float("inf"), float("nan"), -3.4e38
    f = f.t() if transposed else f
    got, want = _parts(f.shape), _parts(f.shape)
    split3(f, *got)
    split3_ref(f, *want)
    for a, b in zip(got, want, strict=True):
        nan = torch.isnan(a)
        assert torch.equal(nan, torch.isnan(b)) and nan.any() == (a is got[2])  # NaN only in hi, where f has it
        assert torch.equal(a.view(torch.int16)[~nan], b.view(torch.int16)[~nan])  # the same bits otherwise


def test_split_kernel_checks_dtypes():
    f = torch.randn(3, 4)
    with pytest.raises(ValueError, match="lo"):
        split3(f, torch.empty(3, 4), *_parts((3, 4))[1:])


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("accumulate,alpha", [(False, 1.0), (False, 0.5), (True, 2.5)])
def test_sum_kernel_matches_reference(out_dtype, accumulate, alpha):
    g = torch.Generator().manual_seed(2)
    prod = torch.randn(5, 27, generator=g)  # column slices: strided inputs
    out0 = torch.randn(5, 9, generator=g).to(out_dtype)
    got, want = out0.clone(), out0.clone()
    sum3(got, prod[:, :9], prod[:, 9:18], prod[:, 18:], accumulate, alpha)
    sum3_ref(want, prod[:, :9], prod[:, 9:18], prod[:, 18:], accumulate, alpha)
    tol = 1e-6 if out_dtype == torch.float32 else 8e-3  # FMA contraction on a GPU: one rounding less
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
    assert not torch.equal(got, out0)


def test_sum_adds_the_small_slices_first():
    lo = torch.tensor([[2.0**-24]])
    mid = torch.tensor([[2.0**-24]])
    hi = torch.tensor([[1.0]])
    out = torch.empty(1, 1)
    sum3_ref(out, lo, mid, hi, False, 1.0)
    assert out.item() == 1.0 + 2.0**-23  # hi first would lose both (1 + 2^-24 rounds to 1, twice)
