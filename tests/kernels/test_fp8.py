"""FP8 E4M3/E5M2 kernels: bit-exact against torch's casts (after saturation), exact dequant, bounded error."""

from __future__ import annotations

import pytest
import torch

from surogate.numba_kernels.fp8 import (
    FORMATS,
    fp8_amax,
    fp8_delayed_scale,
    fp8_delayed_scale_ref,
    fp8_dequantize,
    fp8_dequantize_blocks,
    fp8_dequantize_blocks_ref,
    fp8_dequantize_ref,
    fp8_quantize,
    fp8_quantize_blocks,
    fp8_quantize_blocks_ref,
    fp8_quantize_ref,
    fp8_scale_from_amax,
)

FMTS = ("e4m3", "e5m2")


def _hard_values(fmt: str) -> torch.Tensor:
    """Every representable value, every midpoint between neighbours (ties) and one fp32 ulp either side,
    subnormals, saturation edges, inf, nan, signed zeros."""
    dt, mx = FORMATS[fmt]
    grid = torch.arange(256, dtype=torch.uint8).view(dt).float()
    grid = grid[torch.isfinite(grid)].unique()
    mids = (grid[1:] + grid[:-1]) / 2
    ulp_up = torch.nextafter(mids, torch.tensor(float("inf")))
    ulp_dn = torch.nextafter(mids, torch.tensor(float("-inf")))
    extra = torch.tensor([mx * 1.02, mx * 1.07, -mx * 3, 1e30, float("inf"), float("-inf"), float("nan"), 0.0, -0.0,
                          1e-30, -1e-12, 2.0**-20])
    return torch.cat([grid, mids, ulp_up, ulp_dn, extra])


@pytest.mark.parametrize("fmt", FMTS)
def test_tensor_quantize_is_bit_exact_with_torch_cast(fmt):
    x = _hard_values(fmt)
    scale = torch.ones(1)
    codes = torch.empty(x.numel(), dtype=torch.uint8)
    fp8_quantize(x, codes, scale, fmt)
    ref = fp8_quantize_ref(x, 1.0, fmt)
    assert torch.equal(codes, ref), (x[codes != ref], codes[codes != ref], ref[codes != ref])
    out = torch.empty(x.numel())
    fp8_dequantize(codes, torch.ones(1), out, fmt)
    torch.testing.assert_close(out, fp8_dequantize_ref(codes, 1.0, fmt), equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_tensor_scaled_roundtrip(fmt, dtype):
    x = (torch.randn(3, 67) * 5).to(dtype)
    amax = torch.empty(1)
    fp8_amax(x, amax)
    assert amax.item() == x.float().abs().max().item()
    scale, scale_inv = fp8_scale_from_amax(amax, fmt)
    codes = torch.empty(x.shape, dtype=torch.uint8)
    fp8_quantize(x, codes, scale, fmt)
    assert torch.equal(codes, fp8_quantize_ref(x, scale, fmt))
    out = torch.empty(x.shape, dtype=dtype)
    fp8_dequantize(codes, scale_inv, out, fmt)
    assert torch.equal(out, fp8_dequantize_ref(codes, scale_inv, fmt, dtype))
    rel = 2.0 ** -(4 if fmt == "e4m3" else 3)  # half a mantissa step
    err = (out.float() - x.float()).abs()
    assert torch.all(err <= rel * x.float().abs() + amax / FORMATS[fmt][1] * 2.0**-9 + 1e-30)


@pytest.mark.parametrize("fmt", FMTS)
def test_block_scales_match_reference(fmt):
    x = torch.randn(7, 13) * torch.logspace(-3, 3, 13)  # columns of very different magnitude
    x[4:, :4] = 0.0  # an all-zero tile keeps scale 1
    block = (4, 4)
    codes, scale_inv = torch.empty(7, 13, dtype=torch.uint8), torch.empty(2, 4)
    fp8_quantize_blocks(x, codes, scale_inv, block, fmt)
    ref_codes, ref_si = fp8_quantize_blocks_ref(x, block, fmt)
    assert torch.equal(scale_inv, ref_si)
    assert torch.equal(codes, ref_codes)
    assert scale_inv[1, 0] == 1.0
    out = torch.empty(7, 13, dtype=torch.bfloat16)
    fp8_dequantize_blocks(codes, scale_inv, out, block, fmt)
    assert torch.equal(out, fp8_dequantize_blocks_ref(codes, scale_inv, block, fmt, torch.bfloat16))
    # per-tile scaling keeps small columns accurate where one tensor scale would flush them
    back = fp8_dequantize_blocks_ref(codes, scale_inv, block, fmt)
    assert ((back - x).abs() / x.abs().clamp_min(1e-30))[x != 0].max() < 2.0 ** -(3 if fmt == "e4m3" else 2)


def test_shape_checks():
    with pytest.raises(ValueError, match="scale_inv"):
        fp8_quantize_blocks(torch.zeros(4, 4), torch.zeros(4, 4, dtype=torch.uint8), torch.zeros(2, 2), (4, 4))
    with pytest.raises(ValueError, match="format"):
        fp8_quantize(torch.zeros(4), torch.zeros(4, dtype=torch.uint8), torch.ones(1), "e3m4")


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_by_division_is_bit_exact_with_the_recipes_math(fmt, dtype):
    # the fp8 recipe keeps a dequantization scale s and encodes x / s (runtime/reference/kernels_quant.py);
    # x * (1 / s) would differ in the last fp32 bit, and so in a code now and then
    x = (torch.randn(5, 97) * 3).to(dtype)
    s = torch.tensor([x.float().abs().max().item() / FORMATS[fmt][1] * 1.37])  # not a power of two
    codes = torch.empty(x.shape, dtype=torch.uint8)
    fp8_quantize(x, codes, s, fmt, divide=True)
    truth = (x.float() / s).clamp(-FORMATS[fmt][1], FORMATS[fmt][1]).to(FORMATS[fmt][0]).view(torch.uint8)
    assert torch.equal(codes, truth)
    assert torch.equal(fp8_quantize_ref(x, s, fmt, divide=True), truth)


@pytest.mark.parametrize("window,push", [((0, 4), True), ((1, 5), False), ((0, 0), False), ((2, 2), True)])
def test_delayed_scale_reads_its_window_then_pushes(window, push):
    hist = torch.tensor([3.0, 9.0, 1.0, 2.0, 40.0])
    amax = torch.tensor([5.0])
    scale, h = torch.zeros(1), hist.clone()
    fp8_delayed_scale(amax, h, scale, window, 1e-12, 448.0, push)
    lo, hi = window
    want = max([5.0, *hist[lo:hi].tolist()]) / 448.0
    assert scale.item() == pytest.approx(want, rel=1e-7)
    assert torch.equal(h, torch.tensor([5.0, 3.0, 9.0, 1.0, 2.0]) if push else hist)
    ref_scale, ref_h = torch.zeros(1), hist.clone()
    fp8_delayed_scale_ref(amax, ref_h, ref_scale, window, 1e-12, 448.0, push)
    assert torch.equal(scale, ref_scale) and torch.equal(h, ref_h)


def test_delayed_scale_floor_and_window_check():
    scale = torch.zeros(1)
    fp8_delayed_scale(torch.zeros(1), torch.zeros(3), scale, (0, 3), 1e-30, 57344.0, False)
    assert scale.item() == pytest.approx(1e-30 / 57344.0, rel=1e-6)  # an all-zero tensor: the floor, never 0
    with pytest.raises(ValueError, match="window"):
        fp8_delayed_scale(torch.zeros(1), torch.zeros(3), scale, (2, 4), 1e-12, 448.0, False)
