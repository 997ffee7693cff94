"""Quartet kernels: the Hadamard transform is orthogonal, the kernels equal their references bit for bit
(small and odd shapes, fp32/bf16), stochastic rounding is unbiased and a pure function of its seed."""

from __future__ import annotations

import pytest
import torch

from surogate.numba_kernels import hadamard as hd
from surogate.numba_kernels.hadamard_cuda import hadamard_rht, nvfp4_quartet_quantize

from .helpers import DTYPES


def _buffers(x):
    n = x.numel()
    return (torch.empty(x.shape, dtype=torch.uint8), torch.empty(n // 16, dtype=torch.uint8), torch.empty(1),
            torch.empty(n // 8, dtype=torch.uint8))


def test_hadamard_is_orthogonal_and_symmetric():
    h = hd.hadamard_matrix()
    torch.testing.assert_close(h @ h.t(), torch.eye(32), atol=1e-6, rtol=0)
    assert torch.equal(h, h.t())
    s = hd.random_signs_ref(3)
    assert set(s.tolist()) == {-1.0, 1.0}
    x = torch.randn(5, 96, dtype=torch.float64).float()
    dense = (x.view(5, 3, 32) * s) @ h  # the butterfly reference equals the dense matrix product
    torch.testing.assert_close(hd.rht_ref(x, s), dense.reshape(5, 96), atol=2e-6, rtol=0)
    torch.testing.assert_close(hd.rht_ref(hd.rht_ref(x, s), s, inverse=True), x, atol=2e-6, rtol=0)
    w = torch.randn(7, 96)
    torch.testing.assert_close(hd.rht_ref(x, s) @ hd.rht_ref(w, s).t(), x @ w.t(), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,cols", [(1, 32), (3, 96), (7, 64)])
@pytest.mark.parametrize("inverse", [False, True])
def test_rht_kernel_equals_reference_bitwise(dtype, rows, cols, inverse):
    x = (torch.randn(rows, cols) * 4).to(dtype)
    s = hd.random_signs_ref(rows * cols)
    out = torch.empty(rows, cols)
    hadamard_rht(x, s, out, inverse)
    assert torch.equal(out, hd.rht_ref(x, s, inverse))


def test_rht_rejects_ragged_rows():
    with pytest.raises(ValueError, match="multiple of 32"):
        hadamard_rht(torch.randn(2, 48), hd.random_signs_ref(0), torch.empty(2, 48))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["quest", "sr"])
@pytest.mark.parametrize("shape", [(1, 16), (3, 48), (5, 32)])
def test_quantize_kernel_equals_reference_bitwise(dtype, mode, shape):
    x = (torch.randn(shape) * 3).to(dtype)
    x.view(-1)[:16] = 0  # an all-zero block: scale 0, codes 0
    x.view(-1)[-1] = 40.0  # an outlier: QuEST clips it (mask bit 0)
    bufs = _buffers(x)
    seed = (9 << 32) | 77
    nvfp4_quartet_quantize(x, *bufs, mode, seed)
    for got, want in zip(bufs, hd.nvfp4_quantize_ref(x, mode, seed), strict=True):
        assert torch.equal(got, want.view(got.shape))
    keep = hd.unpack_bits(bufs[3], x.numel())
    assert bool(keep[-1]) is (mode == "sr") and bool(keep[0])


def test_quest_scale_is_rms_based_and_clips_outliers():
    x = torch.randn(64, 16)
    x[:, 0] = 50.0  # one outlier per block
    codes, bits, gs, mask = hd.nvfp4_quantize_ref(x, "quest")
    sf = bits.view(torch.float8_e4m3fn).float() * gs
    rms = x.pow(2).mean(1).sqrt()
    torch.testing.assert_close(sf, hd.QUEST_ALPHA * rms, rtol=0.07, atol=0)  # E4M3 has 3 mantissa bits
    keep = hd.unpack_bits(mask, x.numel()).view(64, 16)
    assert not keep[:, 0].any() and keep[:, 1:].float().mean() > 0.99


def test_sr_is_unbiased():
    """The mean of many independent roundings of x tends to x (4 standard errors), RTN's does not."""
    x = torch.randn(4, 32) * 2
    seeds = 400
    deq = torch.stack([hd.nvfp4_dequantize_ref(*hd.nvfp4_quantize_ref(x, "sr", s)[:3]) for s in range(seeds)])
    mean, std = deq.mean(0), deq.std(0)
    _, bits, gs, _ = hd.nvfp4_quantize_ref(x, "sr", 0)
    step = 2 * (bits.view(torch.float8_e4m3fn).float() * gs).repeat_interleave(16).view_as(x)  # widest grid gap
    # 4 standard errors, plus what a rounding too rare to show in `seeds` draws (p < 5 / seeds) can hide
    bound = 4 * std / seeds**0.5 + 5 * step / seeds
    assert ((mean - x).abs() <= bound).float().mean() > 0.99  # 4 sigma: ~1 in 16000 by chance
    bias_sr = float((mean - x).abs().mean())
    rtn = hd.nvfp4_dequantize_ref(*hd.nvfp4_quantize_ref(x, "quest")[:3])
    assert bias_sr < 0.25 * float((rtn - x).abs().mean())


def test_sr_is_deterministic_per_seed_and_changes_with_it():
    x = torch.randn(8, 32)
    a, b, c = (hd.nvfp4_quantize_ref(x, "sr", s)[0] for s in (5, 5, 6))
    assert torch.equal(a, b)
    assert (a != c).float().mean() > 0.1
    assert torch.equal(hd.uniform_ref(5, 10)[1:], hd.uniform_ref(5, 9, offset=1))


def test_sr_never_clips():
    x = torch.randn(50, 16) * torch.logspace(-3, 3, 50)[:, None]
    codes, bits, gs, _ = hd.nvfp4_quantize_ref(x, "sr", 1)
    sf = bits.view(torch.float8_e4m3fn).float() * gs
    assert (sf * 6 >= x.abs().amax(1) * (1 - 1e-6)).all()


def test_pack_bits_roundtrip_and_bad_input():
    m = torch.rand(37) > 0.5
    assert torch.equal(hd.unpack_bits(hd.pack_bits(m), 37), m)
    with pytest.raises(ValueError, match="multiple of 16"):
        hd.nvfp4_quantize_ref(torch.randn(24), "sr")
    with pytest.raises(ValueError, match="mode"):
        nvfp4_quartet_quantize(torch.randn(16), *_buffers(torch.randn(16)), "rtn")


def test_device_step_enters_the_seed_like_the_reference():
    """A step tensor (as a captured CUDA graph passes it) gives the reference's stream for that step."""
    from surogate.numba_kernels.hadamard_cuda import quartet_signs
    from surogate.runtime.reference.kernels_quartet import stream_seed

    x = torch.randn(2, 32) * 3
    seed = stream_seed(1234, 0, 1, 2)
    bufs = _buffers(x)
    nvfp4_quartet_quantize(x, *bufs, "sr", seed, step=torch.tensor([7]))
    assert torch.equal(bufs[0], hd.nvfp4_quantize_ref(x, "sr", stream_seed(1234, 7, 1, 2))[0])
    assert not torch.equal(bufs[0], hd.nvfp4_quantize_ref(x, "sr", stream_seed(1234, 6, 1, 2))[0])
    signs = torch.empty(32)
    quartet_signs(signs, stream_seed(99, 0, 0, 0), step=torch.tensor([3]))
    assert torch.equal(signs, hd.random_signs_ref(stream_seed(99, 3, 0, 0)))
    assert hd.seed_with_step((5 << 32) | 0xFFFFFFFF, 1) == (5 << 32) | 7  # wraps in the low word only
