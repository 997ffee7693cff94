"""The two elementwise steps of a bf16x3 split GEMM (runtime/backends/cuda_split_gemm.py), one launch each.

split3: an fp32 matrix f as three bf16 parts, hi = bf16(f), mid = bf16(f - hi), lo = bf16(f - hi - mid), so that
hi + mid + lo == f to ~2^-24 relative (3 x 8 significant bits). A residual that is not finite (f = +-inf, NaN, or
|f| above bf16's largest finite value, where hi is already inf) becomes 0: the infinity or NaN is carried by hi
alone, so the product is inf or NaN, never inf - inf.
sum3: out (=|+=) alpha * ((lo + mid) + hi), the three fp32 slices of a split product added smallest first in fp32
and rounded once into out's dtype (fp32 or bf16).

Why kernels: as torch ops these are 5 and 2-3 launches per split GEMM, on ~1000 small GEMMs per micro-step of a
fp32-adapter LoRA job; here one each. Every argument may be a strided view (a transposed weight, a column slice
of the product); elements are visited in a grid-stride loop over rows x cols.
"""

from __future__ import annotations

import functools

import torch

from ._device import converters, get_cuda, grid_for, jit_kernel, launch, threads

cuda = None  # numba.cuda, bound by the first kernel build (lazy import)


# ---------------------------------------------------------------- reference


def split3_ref(f: torch.Tensor, lo: torch.Tensor, mid: torch.Tensor, hi: torch.Tensor) -> None:
    """lo, mid, hi (bf16) <- the three parts of f (fp32), as the kernel computes them."""
    h = f.to(torch.bfloat16)
    res = f - h.float()  # exact in fp32
    res = torch.where(torch.isfinite(res), res, torch.zeros_like(res))
    m = res.to(torch.bfloat16)
    hi.copy_(h)
    mid.copy_(m)
    lo.copy_((res - m.float()).to(torch.bfloat16))  # res - mid exact in fp32, rounded once


def sum3_ref(out: torch.Tensor, lo: torch.Tensor, mid: torch.Tensor, hi: torch.Tensor, accumulate: bool,
             alpha: float) -> None:
    """out (=|+=) alpha * ((lo + mid) + hi), in fp32, rounded once into out."""
    t = (lo.float() + mid.float()) + hi.float()
    v = out.float() + t * alpha if accumulate else (t * alpha if alpha != 1.0 else t)
    out.copy_(v.to(out.dtype))


# ---------------------------------------------------------------- kernels


@functools.cache
def _split_kernel():
    global cuda  # a module global: the simulator swaps `cuda` in kernels' globals at launch
    cuda = get_cuda()
    from numba import float32

    to_f32, to_bf16 = converters(torch.bfloat16)

    @jit_kernel
    def kernel(f, lo, mid, hi):
        rows, cols = f.shape
        n = rows * cols
        for i in range(cuda.grid(1), n, cuda.gridsize(1)):
            r = i // cols
            c = i - r * cols
            v = f[r, c]
            h = to_bf16(v)
            res = v - to_f32(h)
            if not (res - res == float32(0.0)):  # NaN or +-inf (x - x is NaN exactly then)
                res = float32(0.0)
            m = to_bf16(res)
            hi[r, c] = h
            mid[r, c] = m
            lo[r, c] = to_bf16(res - to_f32(m))

    return kernel


@functools.cache
def _sum_kernel(out_dt: torch.dtype, accumulate: bool):
    global cuda
    cuda = get_cuda()
    from numba import float32

    lo_, so = converters(out_dt)
    ACC = accumulate

    @jit_kernel
    def kernel(out, lo, mid, hi, alpha):
        rows, cols = out.shape
        n = rows * cols
        a = float32(alpha)
        for i in range(cuda.grid(1), n, cuda.gridsize(1)):
            r = i // cols
            c = i - r * cols
            t = (lo[r, c] + mid[r, c]) + hi[r, c]
            if ACC:
                out[r, c] = so(lo_(out[r, c]) + t * a)
            else:
                out[r, c] = so(t * a)

    return kernel


# ---------------------------------------------------------------- launchers


def _check(name: str, t: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    if t.dtype != dtype or tuple(t.shape) != shape:
        raise ValueError(f"{name}: expected {dtype} {shape}, got {t.dtype} {tuple(t.shape)}")


def split3(f: torch.Tensor, lo: torch.Tensor, mid: torch.Tensor, hi: torch.Tensor) -> None:
    """lo, mid, hi (bf16 [rows, cols], any strides) <- the bf16x3 parts of f (fp32 [rows, cols], any strides)."""
    _check("f", f, torch.float32, tuple(f.shape))
    for name, t in (("lo", lo), ("mid", mid), ("hi", hi)):
        _check(name, t, torch.bfloat16, tuple(f.shape))
    t = threads()
    launch(_split_kernel(), grid_for(f.numel(), t), t, f, lo, mid, hi)


def sum3(out: torch.Tensor, lo: torch.Tensor, mid: torch.Tensor, hi: torch.Tensor, accumulate: bool,
         alpha: float) -> None:
    """out (fp32 or bf16, =|+=) alpha * ((lo + mid) + hi) for fp32 lo, mid, hi of out's shape (any strides)."""
    for name, s in (("lo", lo), ("mid", mid), ("hi", hi)):
        _check(name, s, torch.float32, tuple(out.shape))
    t = threads()
    launch(_sum_kernel(out.dtype, bool(accumulate)), grid_for(out.numel(), t), t, out, lo, mid, hi, float(alpha))
