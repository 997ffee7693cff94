"""NF4 levels, blockwise 4-bit quantization kernels vs reference, double quantization."""

from __future__ import annotations

import math

import pytest
import torch

from surogate.numba_kernels.nf4 import (
    nf4_dequantize,
    nf4_dequantize_ref,
    nf4_double_quant,
    nf4_levels,
    nf4_quantize,
    nf4_quantize_ref,
)

# The NF4 table as published in the QLoRA paper / bitsandbytes (float32), an external check of nf4_levels().
BNB_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
           -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
           0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
           0.7229568362236023, 1.0]


def test_levels_equal_published_table():
    assert torch.equal(nf4_levels(), torch.tensor(BNB_NF4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,block", [(129, 64), (64, 64), (200, 128)])
def test_quantize_dequantize_match_reference(dtype, n, block):
    x = torch.randn(n).to(dtype)
    x[:block][::7] = 0.0
    nb = math.ceil(n / block)
    packed, absmax = torch.empty((n + 1) // 2, dtype=torch.uint8), torch.empty(nb)
    nf4_quantize(x, packed, absmax, block)
    ref = nf4_quantize_ref(x, block)
    assert torch.equal(absmax, ref.absmax)
    assert torch.equal(packed, ref.packed)
    out = torch.empty(n, dtype=dtype)
    nf4_dequantize(packed, out, block, absmax=absmax)
    assert torch.equal(out, nf4_dequantize_ref(ref, dtype))
    # quantization error: within half the widest level gap, times the block absmax
    gap = torch.diff(nf4_levels()).max().item()
    err = (nf4_dequantize_ref(ref) - x.float()).abs()
    assert torch.all(err <= absmax.repeat_interleave(block)[:n] * gap / 2 + 1e-7)


def test_double_quant_matches_reference_and_bounds_absmax_error():
    n, block = 2 * 300, 2  # 300 tiny blocks: two second-level groups (256 + 44), fast in the simulator
    x = torch.randn(n) * torch.linspace(0.1, 3, n)
    plain = nf4_quantize_ref(x, block)  # the NF4 kernel itself is tested above; here the second level
    packed, absmax = plain.packed, plain.absmax
    qabs, absmax2, offset = torch.empty(300, dtype=torch.uint8), torch.empty(2), torch.empty(1)
    nf4_double_quant(absmax, qabs, absmax2, offset)
    ref = nf4_quantize_ref(x, block, double_quant=True)
    torch.testing.assert_close(offset, ref.offset, rtol=1e-6, atol=0)
    assert torch.equal(absmax2, ref.absmax2)
    assert (qabs != ref.qabsmax).sum() <= 1  # offset may differ in its last bit (reduction order)
    out = torch.empty(n)
    nf4_dequantize(packed, out, block, qabsmax=qabs, absmax2=absmax2, offset=offset)
    ref.qabsmax, ref.absmax2, ref.offset = qabs, absmax2, offset
    assert torch.equal(out, nf4_dequantize_ref(ref))
    # dequantized absmax: within half the widest gap of the 8-bit map, times the group's scale
    from surogate.numba_kernels.nf4 import nf4_absmax_ref
    from surogate.numba_kernels.quant8 import dynamic_map

    bound = absmax2.repeat_interleave(256)[:300] * torch.diff(dynamic_map(True)).max() / 2
    assert torch.all((nf4_absmax_ref(ref) - absmax).abs() <= bound * (1 + 1e-6))


def test_argument_checks():
    with pytest.raises(ValueError, match="power of two"):
        nf4_quantize(torch.zeros(8), torch.zeros(4, dtype=torch.uint8), torch.zeros(3), block=3)
    with pytest.raises(ValueError, match="double"):
        nf4_dequantize(torch.zeros(4, dtype=torch.uint8), torch.zeros(8), 64)
