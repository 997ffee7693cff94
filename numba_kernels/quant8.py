"""Blockwise dynamic 8-bit quantization (the bitsandbytes scheme) and the dynamic map it uses.

Dynamic map (built here, 256 sorted fp32 values in [-1, 1] or [0, 1]): for decade i = 0..6 the values
10^(i-6) * midpoints(linspace(0.1, 1, k + 1)) with k = 2^i (signed map, each value also negated) or
k = 2^(i+1) (unsigned map), plus 0 and 1. Fine steps near zero, coarse near one: a floating-point-like
code with a decimal exponent, as in bitsandbytes' `create_dynamic_map`.
Quantization of a block: absmax = max |x|, code = index of the map value nearest to x / absmax
(ties go to the lower index; absmax 0 gives normalised 0); dequantization: map[code] * absmax.
The nearest search (`nearest_code`) is a device function shared with the 8-bit AdamW kernel.
"""

from __future__ import annotations

import functools
import math

import torch

from ._device import (
    check_contiguous,
    converters,
    get_cuda,
    grid_for,
    helpers,
    jit_kernel,
    launch,
    log2_block,
    threads,
    zeros1,
)

cuda = None  # numba.cuda, bound by the first kernel build (lazy import)


@functools.cache
def _dynamic_map_cached(signed: bool) -> torch.Tensor:
    values = [0.0, 1.0]
    for i in range(7):
        k = 2**i if signed else 2 ** (i + 1)
        edges = torch.linspace(0.1, 1.0, k + 1, dtype=torch.float64)
        mids = ((edges[:-1] + edges[1:]) / 2 * 10.0 ** (i - 6)).tolist()
        values += mids
        if signed:
            values += [-v for v in mids]
    assert len(values) == 256
    return torch.tensor(sorted(values), dtype=torch.float32)


def dynamic_map(signed: bool = True) -> torch.Tensor:
    """The 256-entry sorted dynamic quantization map (fp32): signed for first moments, unsigned for second."""
    return _dynamic_map_cached(bool(signed)).clone()


# ---------------------------------------------------------------- reference


def nearest_code_ref(v: torch.Tensor, qmap: torch.Tensor) -> torch.Tensor:
    """Index of the qmap entry nearest to each v (fp32); ties go to the lower index."""
    lo = (torch.searchsorted(qmap, v.contiguous(), right=True) - 1).clamp(0, 255)
    up = (lo + 1).clamp(max=255)
    take_up = (v - qmap[lo]) > (qmap[up] - v)
    return torch.where(take_up, up, lo).to(torch.uint8)


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    flat = x.float().reshape(-1)
    nb = math.ceil(flat.numel() / block)
    pad = torch.zeros(nb * block, dtype=torch.float32)
    pad[: flat.numel()] = flat
    return pad.view(nb, block)


def normalise_ref(b: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """b / absmax per block row, 0 where absmax is 0."""
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))[:, None].expand_as(b)
    # expanded, never a one-element divisor: torch divides by a CPU scalar as a reciprocal multiply,
    # which is not the IEEE division the kernels do
    return torch.where(absmax[:, None] > 0, b / safe, torch.zeros_like(b))


def quantize_blockwise_ref(
    x: torch.Tensor, qmap: torch.Tensor, block: int = 256, offset: float | torch.Tensor = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes uint8 [numel], absmax fp32 [ceil(numel / block)]) of x - offset."""
    n = x.numel()
    b = _blocks(x.float() - torch.as_tensor(offset, dtype=torch.float32), block)  # zero-padded tail
    absmax = b.abs().amax(dim=1)
    codes = nearest_code_ref(normalise_ref(b, absmax), qmap)
    return codes.reshape(-1)[:n], absmax


def dequantize_blockwise_ref(
    codes: torch.Tensor, absmax: torch.Tensor, qmap: torch.Tensor, block: int = 256,
    offset: float | torch.Tensor = 0.0,
) -> torch.Tensor:
    """fp32 [numel] = qmap[codes] * absmax[i // block] + offset."""
    idx = torch.arange(codes.numel()) // block
    return qmap[codes.long().reshape(-1)] * absmax[idx] + torch.as_tensor(offset, dtype=torch.float32)


# ---------------------------------------------------------------- device functions and kernels


@functools.cache
def nearest_code_device():
    """Device function nearest_code(qmap, v) -> int: binary search in a sorted 256-entry fp32 map."""
    global cuda  # a module global: the simulator swaps `cuda` in kernels' globals at launch
    cuda = get_cuda()

    @cuda.jit(device=True, inline="always")
    def nearest_code(qmap, v):
        lo = 0
        hi = 256
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if qmap[mid] <= v:
                lo = mid
            else:
                hi = mid
        up = min(lo + 1, 255)
        if (v - qmap[lo]) > (qmap[up] - v):
            return up
        return lo

    return nearest_code


@functools.cache
def _quant_kernel(x_dt: torch.dtype):
    global cuda
    cuda = get_cuda()
    from numba import float32, uint8

    lx, _ = converters(x_dt)
    block_max = helpers().block_max
    nearest_code = nearest_code_device()
    T = threads()

    @jit_kernel
    def kernel(x, qmap_g, offset, block, codes, absmax):
        sm = cuda.shared.array(T, float32)
        qmap = cuda.shared.array(256, float32)
        tid = cuda.threadIdx.x
        for k in range(tid, 256, T):
            qmap[k] = qmap_g[k]
        cuda.syncthreads()
        n = x.shape[0]
        off = offset[0]
        for b in range(cuda.blockIdx.x, absmax.shape[0], cuda.gridDim.x):
            start = b * block
            stop = min(n, start + block)
            m = float32(0.0)
            for i in range(start + tid, stop, T):
                m = max(m, abs(lx(x[i]) - off))
            am = block_max(sm, m)
            if tid == 0:
                absmax[b] = am
            for i in range(start + tid, stop, T):
                v = float32(0.0)
                if am > float32(0.0):
                    v = (lx(x[i]) - off) / am
                codes[i] = uint8(nearest_code(qmap, v))

    return kernel


@functools.cache
def _dequant_kernel(o_dt: torch.dtype):
    global cuda
    cuda = get_cuda()
    _, so = converters(o_dt)

    @jit_kernel
    def kernel(codes, absmax, qmap, offset, shift, out):
        off = offset[0]
        for i in range(cuda.grid(1), codes.shape[0], cuda.gridsize(1)):
            out[i] = so(qmap[codes[i]] * absmax[i >> shift] + off)

    return kernel


def quantize_blockwise(
    x: torch.Tensor,
    qmap: torch.Tensor,
    codes: torch.Tensor,
    absmax: torch.Tensor,
    block: int = 256,
    offset: torch.Tensor | None = None,
) -> None:
    """codes uint8 [numel], absmax fp32 [ceil(numel / block)] of x (minus the device scalar `offset`)."""
    check_contiguous("x", x)
    log2_block("block", block)
    nb = math.ceil(x.numel() / block)
    if absmax.numel() != nb or codes.numel() != x.numel():
        raise ValueError(f"need codes [{x.numel()}] and absmax [{nb}] for block {block}")
    off = offset if offset is not None else zeros1(x.device)
    launch(_quant_kernel(x.dtype), grid_for(nb, 1), threads(), x.view(-1), qmap, off, int(block), codes.view(-1), absmax)


def dequantize_blockwise(
    codes: torch.Tensor,
    absmax: torch.Tensor,
    qmap: torch.Tensor,
    out: torch.Tensor,
    block: int = 256,
    offset: torch.Tensor | None = None,
) -> None:
    """out (fp32/bf16, numel of codes) = qmap[codes] * absmax[i // block] (+ the device scalar `offset`)."""
    check_contiguous("out", out)
    shift = log2_block("block", block)
    off = offset if offset is not None else zeros1(codes.device)
    n = codes.numel()
    launch(
        _dequant_kernel(out.dtype), grid_for(n, threads()), threads(), codes.view(-1), absmax, qmap, off, shift,
        out.view(-1),
    )
