"""Numba-CUDA launchers of the Quartet kernels (math and torch references: `hadamard`).

- `hadamard_rht(x, signs, out, inverse)`: blockwise (32) randomized Hadamard transform of the rows of x, one
  thread per group of 32, in registers (five butterfly stages, then the 32^-1/2 scale).
- `quartet_signs(out, seed, step)`: the random +-1 signs of a randomized Hadamard transform.
- `nvfp4_quartet_quantize(x, codes, scales, gscale, mask, mode, seed, step)`: NVFP4 codes/scales/global scale and
  clip mask of x (already rotated), "quest" (round to nearest) or "sr" (stochastic rounding). Three launches:
  tensor amax (`fp8.fp8_amax`, into `gscale`), the global scale (one thread, in place), then one thread per
  16-element block (its two mask bytes included, so no two threads write one byte).
`step` (an int64 device tensor, optional) enters the seed on the device, as the dropout kernel's does, so a
captured CUDA graph draws fresh randomness each step. Every float operation is an explicit fp32 operation in
the reference's order, so the simulator matches the reference bit for bit; on a GPU, ptxas may fuse the QuEST
sum of squares into FMAs (last-bit differences).
"""

from __future__ import annotations

import functools

import torch

from ._device import check_contiguous, converters, get_cuda, grid_for, jit_kernel, launch, threads, zeros1
from .dropout import _GOLDEN, _M32, fmix32_device
from .fp8 import _codec, fp8_amax
from .hadamard import _INV_SQRT, BLOCK, E4M3_MAX, HADAMARD, MODES, QUEST_ALPHA, STEP_STRIDE

cuda = None  # numba.cuda, bound by the first kernel build (lazy import)


@functools.cache
def _rht_kernel(x_dt: torch.dtype, inverse: bool):
    global cuda  # a module global: the simulator swaps `cuda` in kernels' globals at launch
    cuda = get_cuda()
    from numba import float32

    lx, _ = converters(x_dt)
    inv = bool(inverse)

    @jit_kernel
    def kernel(x, signs, out):
        groups = x.shape[0] // HADAMARD
        v = cuda.local.array(HADAMARD, float32)
        for g in range(cuda.grid(1), groups, cuda.gridsize(1)):
            base = g * HADAMARD
            for j in range(HADAMARD):
                v[j] = lx(x[base + j]) if inv else float32(lx(x[base + j]) * signs[j])
            h = 1
            while h < HADAMARD:
                for i in range(0, HADAMARD, 2 * h):
                    for j in range(i, i + h):
                        a, b = v[j], v[j + h]
                        v[j] = float32(a + b)
                        v[j + h] = float32(a - b)
                h *= 2
            for j in range(HADAMARD):
                r = float32(v[j] * float32(_INV_SQRT))
                out[base + j] = float32(r * signs[j]) if inv else r

    return kernel


def hadamard_rht(x: torch.Tensor, signs: torch.Tensor, out: torch.Tensor, inverse: bool = False) -> None:
    """out (fp32, like x) = each group of 32 of each row of x rotated by H32 diag(signs) (inverse: diag(signs) H32)."""
    check_contiguous("x", x)
    check_contiguous("out", out)
    if x.shape[-1] % HADAMARD or out.shape != x.shape or signs.numel() != HADAMARD:
        raise ValueError(f"hadamard_rht: last dim must be a multiple of {HADAMARD}, out like x, {HADAMARD} signs")
    groups = x.numel() // HADAMARD
    launch(_rht_kernel(x.dtype, bool(inverse)), grid_for(groups, threads()), threads(), x.view(-1), signs,
           out.view(-1))


@functools.cache
def _gscale_kernel(quest: bool):
    global cuda
    cuda = get_cuda()
    from numba import float32

    @jit_kernel
    def kernel(gscale):
        if cuda.grid(1) == 0:
            amax = gscale[0]
            if quest:
                g = float32(float32(float32(QUEST_ALPHA) * amax) / float32(E4M3_MAX))
            else:
                g = float32(amax / float32(6.0 * E4M3_MAX))
            gscale[0] = g if g > float32(0.0) else float32(1.0)

    return kernel


@functools.cache
def _quant_kernel(x_dt: torch.dtype, quest: bool):
    global cuda
    cuda = get_cuda()
    import math

    from numba import float32, int64, uint8, uint64

    lx, _ = converters(x_dt)
    encode, decode = _codec("e4m3")
    fmix32 = fmix32_device()
    m32, s32, s8 = uint64(_M32), uint64(32), uint64(8)

    jit_dev = cuda.jit(device=True, inline="always")

    @jit_dev
    def _mag(i):  # E2M1 magnitude of index i (0..7)
        if i < 4:
            return float32(0.5) * float32(i)
        if i == 7:
            return float32(6.0)
        return float32(i - 2)

    @jit_dev
    def _rtn_index(a):  # nearest magnitude index, ties to the smaller: how many midpoints lie below a
        n = 0
        for m in (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0):
            if a > float32(m):
                n += 1
        return n

    @jit_dev
    def _floor_index(a):  # index of the largest magnitude <= a, at most 6 (so index + 1 exists)
        n = 0
        for m in (0.5, 1.0, 1.5, 2.0, 3.0, 4.0):
            if a >= float32(m):
                n += 1
        return n

    @jit_kernel
    def kernel(x, codes, scales, gscale, mask, seed_lo, seed_hi, step):
        nblocks = x.shape[0] // BLOCK
        gs = gscale[0]
        low = (uint64(seed_lo) + uint64(step[0]) * uint64(STEP_STRIDE)) & m32
        hs = fmix32(low ^ uint64(_GOLDEN))
        hs = fmix32(hs ^ uint64(seed_hi))
        for blk in range(cuda.grid(1), nblocks, cuda.gridsize(1)):
            base = blk * BLOCK
            if quest:
                ss = float32(0.0)
                for j in range(BLOCK):
                    v = lx(x[base + j])
                    ss = float32(ss + float32(v * v))
                raw = float32(float32(QUEST_ALPHA) * float32(math.sqrt(float32(ss / float32(BLOCK)))))
            else:
                am = float32(0.0)
                for j in range(BLOCK):
                    am = max(am, abs(lx(x[base + j])))
                raw = float32(am / float32(6.0))
            v = min(float32(raw / gs), float32(E4M3_MAX))
            code = encode(v)
            if not quest and decode(code) < v and code < int64(0x7E):
                code += int64(1)  # round the scale up: stochastic rounding never clips
            scales[blk] = uint8(code)
            sf = float32(decode(code) * gs)
            bits0 = 0
            bits1 = 0
            for j in range(BLOCK):
                y = float32(lx(x[base + j]) / sf) if sf > float32(0.0) else float32(0.0)
                a = min(abs(y), float32(6.0))
                if quest:
                    keep = 1 if abs(y) <= float32(6.0) else 0
                    mag = _rtn_index(a)
                else:
                    keep = 1
                    ctr = uint64(base + j)
                    h = fmix32(hs ^ (ctr & m32))
                    h = fmix32(h ^ (ctr >> s32))
                    u = float32(float32(h >> s8) * float32(5.9604644775390625e-08))  # 2^-24
                    lo = _floor_index(a)
                    glo, ghi = _mag(lo), _mag(lo + 1)
                    p = float32(float32(a - glo) / float32(ghi - glo))
                    mag = lo + 1 if u < p else lo
                if y < float32(0.0) and mag > 0:
                    mag += 8
                codes[base + j] = uint8(mag)
                if j < 8:
                    bits0 |= keep << j
                else:
                    bits1 |= keep << (j - 8)
            mask[2 * blk] = uint8(bits0)
            mask[2 * blk + 1] = uint8(bits1)

    return kernel


def nvfp4_quartet_quantize(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, gscale: torch.Tensor,
                           mask: torch.Tensor, mode: str, seed: int = 0, step: torch.Tensor | None = None) -> None:
    """NVFP4 of x (fp32/bf16, numel a multiple of 16): codes uint8 like x, scales uint8 (E4M3 bits) [n/16],
    gscale fp32 [1], mask uint8 [n/8]; `mode` "quest" or "sr" (uniforms from `seed_with_step(seed, step[0])`).

    `step`: int64 tensor [1] on x's device, read by the kernel (a captured CUDA graph rounds afresh each step)."""
    if mode not in MODES:
        raise ValueError(f"unknown NVFP4 quantization mode {mode!r}; expected one of {', '.join(MODES)}")
    for name, t in (("x", x), ("codes", codes), ("scales", scales), ("mask", mask)):
        check_contiguous(name, t)
    n = x.numel()
    if n % BLOCK or codes.numel() != n or scales.numel() != n // BLOCK or mask.numel() != n // 8:
        raise ValueError(f"nvfp4_quartet_quantize: numel {n} must be a multiple of {BLOCK}; codes like x, "
                         f"{n // BLOCK} scales, {n // 8} mask bytes")
    quest = mode == "quest"
    fp8_amax(x, gscale)
    launch(_gscale_kernel(quest), 1, 1, gscale)
    launch(_quant_kernel(x.dtype, quest), grid_for(n // BLOCK, threads()), threads(), x.view(-1), codes.view(-1),
           scales.view(-1), gscale, mask.view(-1), int(seed) & _M32, (int(seed) >> 32) & _M32,
           step if step is not None else zeros1(x.device, torch.int64))


@functools.cache
def _signs_kernel():
    global cuda
    cuda = get_cuda()
    from numba import float32, uint64

    fmix32 = fmix32_device()
    m32 = uint64(_M32)

    @jit_kernel
    def kernel(out, seed_lo, seed_hi, step):
        j = cuda.grid(1)
        if j < out.shape[0]:
            lo = (uint64(seed_lo) + uint64(step[0]) * uint64(STEP_STRIDE)) & m32
            h = fmix32(fmix32(lo ^ uint64(_GOLDEN)) ^ uint64(seed_hi))
            h = fmix32(fmix32(h ^ uint64(j)) ^ uint64(0))
            out[j] = float32(1.0) - float32(2.0) * float32(h & uint64(1))

    return kernel


def quartet_signs(out: torch.Tensor, seed: int, step: torch.Tensor | None = None) -> None:
    """out (fp32 [n]) = +-1 from the counter hash of `seed_with_step(seed, step[0])` (the RHT's random signs)."""
    check_contiguous("out", out)
    launch(_signs_kernel(), grid_for(out.numel(), threads()), threads(), out.view(-1), int(seed) & _M32,
           (int(seed) >> 32) & _M32, step if step is not None else zeros1(out.device, torch.int64))
