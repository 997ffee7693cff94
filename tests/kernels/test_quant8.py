"""Dynamic 8-bit map and blockwise quantization kernels vs reference."""

from __future__ import annotations

import pytest
import torch

from surogate.numba_kernels.quant8 import (
    dequantize_blockwise,
    dequantize_blockwise_ref,
    dynamic_map,
    nearest_code_ref,
    quantize_blockwise,
    quantize_blockwise_ref,
)


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_shape(signed):
    q = dynamic_map(signed)
    assert q.shape == (256,) and torch.all(q[1:] > q[:-1])  # sorted, distinct
    assert q.max() == 1.0 and (0.0 in q.tolist())
    assert (q.min() == -q[q < 1].max()) if signed else q.min() == 0.0
    # dynamic: much finer resolution near zero than near one
    pos = q[q > 0]
    assert pos[1] - pos[0] < 1e-5 and pos[-1] - pos[-2] > 1e-3


def test_nearest_code_ties_and_range():
    q = dynamic_map(True)
    mid = (q[100] + q[101]) / 2
    v = torch.tensor([-2.0, 2.0, q[37].item(), mid.item()])
    codes = nearest_code_ref(v, q)
    assert codes.tolist()[:3] == [0, 255, 37]
    exact_tie = (mid - q[100]) == (q[101] - mid)
    assert codes[3] == 100 or not exact_tie


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("signed", [True, False])
def test_kernel_matches_reference(dtype, signed):
    x = torch.randn(301) * torch.logspace(-4, 1, 301)
    x = (x if signed else x.abs()).to(dtype)
    x[64:128] = 0  # an all-zero block
    q = dynamic_map(signed)
    block = 64
    codes, absmax = torch.empty(301, dtype=torch.uint8), torch.empty(5)
    quantize_blockwise(x, q, codes, absmax, block)
    ref_codes, ref_absmax = quantize_blockwise_ref(x, q, block)
    assert torch.equal(absmax, ref_absmax)
    assert torch.equal(codes, ref_codes)
    out = torch.empty(301)
    dequantize_blockwise(codes, absmax, q, out, block)
    back = dequantize_blockwise_ref(codes, absmax, q, block)
    assert torch.equal(out, back)
    # error bound: half the local gap of the map, times absmax
    gaps = torch.diff(q).max()
    assert torch.all((back - x.float()).abs() <= absmax.repeat_interleave(block)[:301] * gaps / 2 + 1e-12)
