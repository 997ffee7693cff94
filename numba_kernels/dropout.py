"""LoRA dropout with a counter-based mask: forward apply and backward (the same function).

The keep mask of element i is a pure function of (seed, offset + i): nothing is stored between forward
and backward, and the torch reference reproduces the kernel's mask bit for bit. With `step` (an int64 device
tensor [1]) the counter is offset + step[0] * n + i, read on the device: a CUDA graph captured once replays
with the step written into that tensor before each replay (no host value frozen into the capture).
Hash: four rounds of the murmur3 32-bit finaliser (fmix32) over the 32-bit halves of seed and counter;
u = (h >> 8) * 2^-24 is uniform on [0, 1) with 24 bits; keep iff u >= p. Every product is of two
values below 2^32, so it is exact in uint64 (kernel) and correct modulo 2^64 in int64 (torch).
    out = x * keep / (1 - p)        (fp32 math, one rounding to the output dtype)
or, with `scale=1.0` (the mask alone; a LoRA forward whose GEMM applies 1 / (1 - p), compiler/passes/lora.py),
    out = x * keep                  (exact in x's dtype)
"""

from __future__ import annotations

import functools

import torch

from ._device import check_contiguous, converters, get_cuda, grid_for, jit_kernel, launch, threads, zeros1

cuda = None  # numba.cuda, bound by the first kernel build (lazy import)

_M32 = 0xFFFFFFFF
_C1 = 0x85EBCA6B
_C2 = 0xC2B2AE35
_GOLDEN = 0x9E3779B9


def _fmix32_t(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = (h * _C1) & _M32
    h = h ^ (h >> 13)
    h = (h * _C2) & _M32
    return h ^ (h >> 16)


def shard_counters(offset: int, n: int, rows: int = 1, token_shard: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """The counters of n elements: offset + i, or, for shard r of sp along dim 1 of a tensor of `rows` rows (sequence
    parallelism), the counters its elements have in the whole rows: offset + row * (sp * per_row) + r * per_row + j."""
    i = torch.arange(n, dtype=torch.int64)
    r, sp = token_shard
    if sp == 1:
        return i + int(offset)
    per_row = n // rows
    return int(offset) + (i // per_row) * (per_row * sp) + r * per_row + i % per_row


def dropout_hash_ref(seed: int, offset: int, n: int, rows: int = 1,
                     token_shard: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """32-bit hashes (int64 tensor) of counters offset .. offset + n - 1 under `seed` (`shard_counters`)."""
    ctr = shard_counters(offset, n, rows, token_shard)
    h = _fmix32_t(torch.tensor((seed & _M32) ^ _GOLDEN, dtype=torch.int64))
    h = _fmix32_t(h ^ ((seed >> 32) & _M32))
    h = _fmix32_t(h ^ (ctr & _M32))
    return _fmix32_t(h ^ ((ctr >> 32) & _M32))


def dropout_mask_ref(seed: int, offset: int, n: int, p: float, rows: int = 1,
                     token_shard: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """Boolean keep mask of n elements."""
    u = (dropout_hash_ref(seed, offset, n, rows, token_shard) >> 8).to(torch.float32) * (2.0**-24)
    return u >= torch.tensor(p, dtype=torch.float32)


def dropout_ref(x: torch.Tensor, p: float, seed: int, offset: int = 0, scale: float | None = None,
                token_shard: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """x * keep * scale, scale 1 / (1 - p) unless given (for backward pass dout: the same call gives dx);
    `token_shard` (r, sp): x is shard r of sp along dim 1, its counters those of the whole rows."""
    if p <= 0.0:
        return x.clone()
    rows = x.shape[0] if x.dim() > 1 else 1
    keep = dropout_mask_ref(seed, offset, x.numel(), p, rows, token_shard).reshape(x.shape)
    scale = torch.tensor(1.0 / (1.0 - p) if scale is None else scale, dtype=torch.float32)
    return (x.float() * keep * scale).to(x.dtype)


@functools.cache
def fmix32_device():
    """murmur3's 32-bit finaliser as a device function (the dropout and Quartet counter-based RNGs)."""
    global cuda
    cuda = get_cuda()
    from numba import uint64

    m32, c1, c2 = uint64(_M32), uint64(_C1), uint64(_C2)
    s13, s16 = uint64(13), uint64(16)

    @cuda.jit(device=True, inline="always")
    def fmix32(h):
        h = h ^ (h >> s16)
        h = (h * c1) & m32
        h = h ^ (h >> s13)
        h = (h * c2) & m32
        return h ^ (h >> s16)

    return fmix32


@functools.cache
def _kernel(x_dt: torch.dtype, o_dt: torch.dtype):
    global cuda  # a module global: the simulator swaps `cuda` in kernels' globals at launch
    cuda = get_cuda()
    from numba import float32, uint64

    lx, _ = converters(x_dt)
    _, so = converters(o_dt)
    m32 = uint64(_M32)
    s32, s8 = uint64(32), uint64(8)
    fmix32 = fmix32_device()

    @jit_kernel
    def kernel(x, out, p, scale, seed_lo, seed_hi, offset, step, per_row, full_row, shard_off, sp):
        n = x.shape[0]
        base = uint64(offset) + uint64(step[0]) * uint64(n) * uint64(sp)
        hs = fmix32(uint64(seed_lo) ^ uint64(_GOLDEN))
        hs = fmix32(hs ^ uint64(seed_hi))
        pf = float32(p)
        sc = float32(scale)
        for i in range(cuda.grid(1), n, cuda.gridsize(1)):
            if sp == 1:  # (uniform branch: one process pays no 64-bit division)
                ctr = base + uint64(i)
            else:
                ctr = base + uint64(i // per_row) * uint64(full_row) + uint64(shard_off) + uint64(i % per_row)
            h = fmix32(hs ^ (ctr & m32))
            h = fmix32(h ^ (ctr >> s32))
            u = float32(h >> s8) * float32(5.9604644775390625e-08)  # 2^-24
            if u >= pf:
                out[i] = so(lx(x[i]) * sc)
            else:
                out[i] = so(float32(0.0))

    return kernel


def dropout_apply(x: torch.Tensor, out: torch.Tensor, p: float, seed: int, offset: int = 0,
                  step: torch.Tensor | None = None, scale: float | None = None,
                  token_shard: tuple[int, int] = (0, 1)) -> None:
    """out = x * keep(seed, offset [+ step[0] * numel] + i) * scale, scale 1 / (1 - p) unless given (1.0: the
    mask alone). Backward: (dout, dx), the same seed/offset/scale.

    `step`: int64 tensor [1] on x's device, read by the kernel (graph-capturable step-dependent masks).
    `token_shard` (r, sp): x is shard r of sp along dim 1 (sequence parallelism): each element's counter is the one
    it has in the whole rows (`shard_counters`), so the shards together draw one process's mask."""
    check_contiguous("x", x)
    check_contiguous("out", out)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    n = x.numel()
    r, sp = token_shard
    per_row = n // x.shape[0] if sp > 1 and x.dim() > 1 else max(n, 1)
    kernel = _kernel(x.dtype, out.dtype)
    launch(
        kernel,
        grid_for(n, threads()),
        threads(),
        x.view(-1),
        out.view(-1),
        float(p),
        1.0 / (1.0 - p) if scale is None else float(scale),
        int(seed) & _M32,
        (int(seed) >> 32) & _M32,
        int(offset),
        step if step is not None else zeros1(x.device, torch.int64),
        per_row,
        per_row * sp,
        r * per_row,
        sp,
    )
