"""NF4 blockwise 4-bit quantization (QLoRA / bitsandbytes layout), with optional double quantization.

Math (the definition):
  levels: the 16 NF4 values, normal quantiles normalised to [-1, 1] (built in `nf4_levels` the way
          bitsandbytes builds them: ppf of linspace(0.9677083, 0.5) for 8 positive and 7 negative values, and 0).
  quantize a block of `block` values: absmax = max |x|; n = x * (1 / absmax); code = the nearest level
          (count of level midpoints strictly below n, as bitsandbytes' decision tree); two codes per byte,
          the first element in the high nibble.
  dequantize: levels[code] * absmax.
  double quantization (`qlora_bnb_double_quant`): offset = mean(absmax); the absmax values minus offset are
          quantized blockwise (256 per block) with the signed dynamic 8-bit map to uint8 codes plus one fp32
          scale per 256 blocks; dequantization recovers absmax = map[code] * absmax2 + offset on the fly.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from ._device import (
    check_contiguous,
    converters,
    device_constant,
    get_cuda,
    grid_for,
    helpers,
    jit_kernel,
    launch,
    log2_block,
    threads,
    zeros1,
)
from .quant8 import dequantize_blockwise_ref, dynamic_map, quantize_blockwise, quantize_blockwise_ref

cuda = None  # numba.cuda, bound by the first kernel build (lazy import)

NESTED_BLOCK = 256  # absmax values per second-level scale (as bitsandbytes)


@functools.cache
def _levels() -> torch.Tensor:
    offset = 0.9677083
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9)[:-1].double())
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8)[:-1].double())
    v = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).float().sort().values
    return v / v.max()


def nf4_levels() -> torch.Tensor:
    """The 16 NF4 levels (fp32, ascending, -1 .. 1, containing 0)."""
    return _levels().clone()


def nf4_midpoints() -> torch.Tensor:
    """The 15 decision thresholds between consecutive levels (fp32)."""
    v = _levels()
    return (v[1:] + v[:-1]) / 2


@dataclass
class NF4Tensor:
    """A quantized tensor: packed codes plus either fp32 absmax or its double-quantized form."""

    packed: torch.Tensor  # uint8 [ceil(numel / 2)]
    absmax: torch.Tensor | None  # fp32 [blocks] (plain)
    qabsmax: torch.Tensor | None  # uint8 [blocks] (double quant)
    absmax2: torch.Tensor | None  # fp32 [ceil(blocks / 256)] (double quant)
    offset: torch.Tensor | None  # fp32 [1] (double quant)
    block: int
    shape: tuple[int, ...]


# ---------------------------------------------------------------- reference


def nf4_quantize_ref(x: torch.Tensor, block: int = 64, double_quant: bool = False) -> NF4Tensor:
    n = x.numel()
    nb = math.ceil(n / block)
    flat = torch.zeros(nb * block, dtype=torch.float32)
    flat[:n] = x.float().reshape(-1)
    b = flat.view(nb, block)
    absmax = b.abs().amax(dim=1)
    inv = torch.where(absmax > 0, 1.0 / torch.where(absmax > 0, absmax, torch.ones_like(absmax)), 0.0)
    codes = torch.bucketize(b * inv[:, None], nf4_midpoints(), right=False).reshape(-1)[:n]
    if n % 2:
        codes = torch.cat([codes, torch.zeros(1, dtype=codes.dtype)])
    packed = ((codes[0::2] << 4) | codes[1::2]).to(torch.uint8)
    if not double_quant:
        return NF4Tensor(packed, absmax, None, None, None, block, tuple(x.shape))
    offset = absmax.mean().reshape(1)
    qabs, absmax2 = quantize_blockwise_ref(absmax, dynamic_map(True), NESTED_BLOCK, offset)
    return NF4Tensor(packed, None, qabs, absmax2, offset, block, tuple(x.shape))


def nf4_absmax_ref(q: NF4Tensor) -> torch.Tensor:
    if q.absmax is not None:
        return q.absmax
    return dequantize_blockwise_ref(q.qabsmax, q.absmax2, dynamic_map(True), NESTED_BLOCK, q.offset)


def nf4_dequantize_ref(q: NF4Tensor, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    n = math.prod(q.shape)
    codes = torch.stack([q.packed >> 4, q.packed & 0xF], dim=1).reshape(-1)[:n].long()
    absmax = nf4_absmax_ref(q)
    vals = _levels()[codes] * absmax[torch.arange(n) // q.block]
    return vals.to(out_dtype).reshape(q.shape)


# ---------------------------------------------------------------- kernels


@functools.cache
def _quant_kernel(x_dt: torch.dtype):
    global cuda  # a module global: the simulator swaps `cuda` in kernels' globals at launch
    cuda = get_cuda()
    from numba import float32, int32, uint8

    lx, _ = converters(x_dt)
    block_max = helpers().block_max
    T = threads()

    @cuda.jit(device=True, inline="always")
    def code_of(mids, v):
        c = int32(0)
        for k in range(15):
            if v > mids[k]:
                c += int32(1)
        return c

    @jit_kernel
    def kernel(x, mids_g, block, packed, absmax):
        sm = cuda.shared.array(T, float32)
        mids = cuda.shared.array(15, float32)
        tid = cuda.threadIdx.x
        if tid < 15:
            mids[tid] = mids_g[tid]
        cuda.syncthreads()
        n = x.shape[0]
        half = block // 2  # block is even: a byte never straddles two blocks
        for b in range(cuda.blockIdx.x, absmax.shape[0], cuda.gridDim.x):
            start = b * block
            stop = min(n, start + block)
            m = float32(0.0)
            for i in range(start + tid, stop, T):
                m = max(m, abs(lx(x[i])))
            am = block_max(sm, m)
            if tid == 0:
                absmax[b] = am
            inv = float32(0.0)
            if am > float32(0.0):
                inv = float32(1.0) / am
            for j in range(b * half + tid, (stop + 1) // 2, T):
                hi = code_of(mids, lx(x[2 * j]) * inv)
                lo = int32(0)
                if 2 * j + 1 < n:
                    lo = code_of(mids, lx(x[2 * j + 1]) * inv)
                packed[j] = uint8((hi << 4) | lo)

    return kernel


@functools.cache
def _dequant_kernel(o_dt: torch.dtype, nested: bool):
    global cuda
    cuda = get_cuda()
    _, so = converters(o_dt)

    @jit_kernel
    def kernel(packed, levels, shift, n, absmax, qabsmax, absmax2, qmap, offset, out):
        for j in range(cuda.grid(1), packed.shape[0], cuda.gridsize(1)):
            b = (2 * j) >> shift
            if nested:
                a = qmap[qabsmax[b]] * absmax2[b >> 8] + offset[0]  # NESTED_BLOCK = 256
            else:
                a = absmax[b]
            byte = packed[j]
            out[2 * j] = so(levels[byte >> 4] * a)
            if 2 * j + 1 < n:
                out[2 * j + 1] = so(levels[byte & 15] * a)

    return kernel


def nf4_quantize(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    block: int = 64,
    levels_mids: torch.Tensor | None = None,
) -> None:
    """packed uint8 [ceil(numel / 2)] and absmax fp32 [ceil(numel / block)] of x (fp32 or bf16)."""
    check_contiguous("x", x)
    if block < 2:
        raise ValueError(f"NF4 block size must be at least 2, got {block}")
    log2_block("NF4 block size", block)
    n = x.numel()
    nb = math.ceil(n / block)
    if packed.numel() != (n + 1) // 2 or absmax.numel() != nb:
        raise ValueError(f"need packed [{(n + 1) // 2}] and absmax [{nb}] for {n} values in blocks of {block}")
    mids = levels_mids if levels_mids is not None else device_constant("nf4-mids", x.device, nf4_midpoints)
    launch(_quant_kernel(x.dtype), grid_for(nb, 1), threads(), x.view(-1), mids, int(block), packed, absmax)


def nf4_double_quant(
    absmax: torch.Tensor, qabsmax: torch.Tensor, absmax2: torch.Tensor, offset: torch.Tensor,
    qmap: torch.Tensor | None = None,
) -> None:
    """offset[0] = mean(absmax); qabsmax uint8 / absmax2 fp32 [ceil(blocks / 256)] from absmax - offset."""
    torch.mean(absmax, dim=0, keepdim=True, out=offset)
    qm = qmap if qmap is not None else device_constant("qmap-signed", absmax.device, lambda: dynamic_map(True))
    quantize_blockwise(absmax, qm, qabsmax, absmax2, NESTED_BLOCK, offset)


def nf4_dequantize(
    packed: torch.Tensor,
    out: torch.Tensor,
    block: int = 64,
    absmax: torch.Tensor | None = None,
    qabsmax: torch.Tensor | None = None,
    absmax2: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    levels: torch.Tensor | None = None,
    qmap: torch.Tensor | None = None,
) -> None:
    """out (fp32/bf16, any shape of numel n) from packed codes and absmax (plain, or double-quantized)."""
    check_contiguous("out", out)
    nested = absmax is None
    if nested and (qabsmax is None or absmax2 is None or offset is None):
        raise ValueError("nf4_dequantize needs absmax, or qabsmax + absmax2 + offset (double quantization)")
    dev = packed.device
    lv = levels if levels is not None else device_constant("nf4-levels", dev, nf4_levels)
    dummy_f, dummy_u = zeros1(dev), zeros1(dev, torch.uint8)
    if nested:
        qm = qmap if qmap is not None else device_constant("qmap-signed", dev, lambda: dynamic_map(True))
    else:
        qm = dummy_f
    launch(
        _dequant_kernel(out.dtype, nested),
        grid_for(packed.numel(), threads()),
        threads(),
        packed,
        lv,
        log2_block("NF4 block size", block),
        int(out.numel()),
        dummy_f if nested else absmax,
        qabsmax if nested else dummy_u,
        absmax2 if nested else dummy_f,
        qm,
        offset if nested else dummy_f,
        out.view(-1),
    )
