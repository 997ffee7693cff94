"""4-bit lookup-table dequantization in the arena's layout: the reference equals the format definition
(`runtime.reference.quant.dequantize`), the Numba kernel (simulator) equals the reference."""

from __future__ import annotations

import pytest
import torch

from surogate.numba_kernels.lut_dequant import lut_dequantize, lut_dequantize_ref
from surogate.runtime.reference import quant


def _w(shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("double", [False, True])
def test_reference_is_the_nf4_format_math(double):
    w = _w((37, 45))  # 1665 elements: a partial last block of 64, 27 blocks
    parts = quant.quantize("nf4", w, 64, double_quant=double)
    want = quant.dequantize("nf4", parts, tuple(w.shape), 64, double)
    if double:
        got = lut_dequantize_ref(parts[0], quant.NF4_CODE, parts[1], 64, s2=parts[2][:-1], offset=parts[2][-1:],
                                 group=quant.DOUBLE_QUANT_GROUP)
    else:
        got = lut_dequantize_ref(parts[0], quant.NF4_CODE, parts[1], 64)
    assert torch.equal(got, want)
    assert (got - w).abs().max() < 0.2 * w.abs().max()  # and it is a dequantization of w


def test_reference_is_the_fp4_format_math():
    w = _w((9, 40), seed=1)
    parts = quant.quantize("fp4", w, 16)
    want = quant.dequantize("fp4", parts, tuple(w.shape), 16)
    got = lut_dequantize_ref(parts[0], quant.E2M1, parts[1].float() * parts[2].float(), quant.NVFP4_BLOCK)
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("double", [False, True])
def test_kernel_matches_reference(dtype, double):
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 16, (5, 41), generator=g, dtype=torch.uint8)  # 205: blocks of 16, last one partial
    if double:
        scale, s2, off = torch.randint(0, 256, (13,), generator=g, dtype=torch.uint8), torch.rand(4) * 0.1, \
            torch.tensor([0.25])
        kw = {"s2": s2, "offset": off, "group": 4}
    else:
        scale, kw = torch.rand(13, generator=g) + 0.1, {}
    out = torch.full((5, 41), float("nan"), dtype=dtype)  # poisoned: every element must be written
    lut_dequantize(codes, quant.NF4_CODE.float(), scale, 16, out, **kw)
    want = lut_dequantize_ref(codes, quant.NF4_CODE, scale, 16, **kw).to(dtype)
    assert not out.isnan().any()
    torch.testing.assert_close(out, want, rtol=0, atol=0)


def test_bad_arguments_are_refused():
    codes = torch.zeros(10, dtype=torch.uint8)
    with pytest.raises(ValueError, match="elements"):
        lut_dequantize(codes, quant.NF4_CODE.float(), torch.ones(1), 16, torch.empty(9))
    with pytest.raises(TypeError, match="uint8 codes"):
        lut_dequantize(codes.long(), quant.NF4_CODE.float(), torch.ones(1), 16, torch.empty(10))


def test_block_and_group_must_be_powers_of_two():
    codes = torch.zeros(12, dtype=torch.uint8)
    with pytest.raises(ValueError, match="power of two"):
        lut_dequantize(codes, quant.NF4_CODE.float(), torch.ones(1), 12, torch.empty(12))
