"""SwiGLU forward/backward: out = silu(gate) * up.

Math (the definition; HF `act_fn(gate_proj(x)) * up_proj(x)`): silu is computed in fp32 and rounded to
the storage dtype, then multiplied by `up` (as torch does in bf16). Backward, with sg = sigmoid(gate):
    dgate = dout * up * sg * (1 + gate * (1 - sg)),   dup = dout * silu(gate)
Grid-stride over rows (a block per row, threads across columns: coalesced, no index division); gate/up/out may be strided views (e.g. the two halves
of a fused [rows, 2 * cols] gate_up buffer) as long as the last dimension is contiguous.

Wide path (`_fwd_wide_kernel` / `_bwd_wide_kernel`): each thread handles UNROLL independent words per
iteration (all loads issued before any store), a word being 4 bf16 (int64 view), 2 bf16 (int32 view) or one
float32; all tensors bfloat16 with divisible, aligned rows (`_vec.word_view`), or all float32. Anything else
(mixed dtypes, odd columns, misaligned views) takes the scalar kernels. Same float32 math, same bits.
"""

from __future__ import annotations

import functools
import math

import torch

from ._device import converters, get_cuda, grid_for, jit_kernel, launch, threads
from ._vec import vec_helpers, vec_width, word_view

cuda = None  # numba.cuda, bound by the first kernel build (lazy import)

UNROLL = 4  # words per thread per iteration on the wide path


def swiglu_forward_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up with HF's rounding: silu rounds to the dtype before the product."""
    act = torch.nn.functional.silu(gate.float()).to(gate.dtype)
    return (act.float() * up.float()).to(gate.dtype)


def swiglu_backward_ref(
    dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dgate, dup) in fp32 math, cast to the input dtypes."""
    g, u, d = gate.float(), up.float(), dout.float()
    sg = torch.sigmoid(g)
    silu = g * sg
    dgate = d * u * sg * (1 + g * (1 - sg))
    dup = d * silu
    return dgate.to(gate.dtype), dup.to(up.dtype)


@functools.cache
def _fwd_kernel(g_dt: torch.dtype, u_dt: torch.dtype, o_dt: torch.dtype):
    global cuda  # a module global: the simulator swaps `cuda` in kernels' globals at launch
    cuda = get_cuda()
    from numba import float32

    lg, sg_ = converters(g_dt)
    lu, _ = converters(u_dt)
    _, so = converters(o_dt)

    T = threads()

    @jit_kernel
    def kernel(gate, up, out):
        rows, cols = gate.shape
        for r in range(cuda.blockIdx.x, rows, cuda.gridDim.x):  # a block per row: no index division
            for c in range(cuda.threadIdx.x, cols, T):
                g = lg(gate[r, c])
                silu = g / (float32(1.0) + float32(math.exp(-g)))
                act = lg(sg_(silu))  # HF rounds the activation to the dtype before the product
                out[r, c] = so(act * lu(up[r, c]))

    return kernel


@functools.cache
def _bwd_kernel(d_dt: torch.dtype, g_dt: torch.dtype, u_dt: torch.dtype):
    global cuda
    cuda = get_cuda()
    from numba import float32

    ld, _ = converters(d_dt)
    lg, sg_ = converters(g_dt)
    lu, su = converters(u_dt)

    T = threads()

    @jit_kernel
    def kernel(dout, gate, up, dgate, dup):
        rows, cols = gate.shape
        one = float32(1.0)
        for r in range(cuda.blockIdx.x, rows, cuda.gridDim.x):
            for c in range(cuda.threadIdx.x, cols, T):
                g = lg(gate[r, c])
                u = lu(up[r, c])
                d = ld(dout[r, c])
                s = one / (one + float32(math.exp(-g)))
                dgate[r, c] = sg_(d * u * s * (one + g * (one - s)))
                dup[r, c] = su(d * g * s)

    return kernel


def _word_fns(width: int):
    """(fwd(g, u) -> out, bwd(d, g, u) -> (dgate, dup)) on one word of each tensor: 4 or 2 packed bf16, or
    one float32 (width 1). The float32 math is the scalar kernels', expression for expression."""
    cuda_mod = get_cuda()
    from numba import float32

    jit_dev = cuda_mod.jit(device=True, inline="always")
    one = float32(1.0)
    if width == 1:
        ld, st = converters(torch.float32)
        rnd = ld  # float32 storage: the activation's rounding is the identity
    else:
        vh = vec_helpers()
        ld = st = None
        rnd = vh.round_bf16

    @jit_dev
    def act_mul(g, u):
        silu = g / (float32(1.0) + float32(math.exp(-g)))
        return rnd(silu) * u  # HF rounds the activation to the dtype before the product

    @jit_dev
    def grads(d, g, u):
        s = one / (one + float32(math.exp(-g)))
        return d * u * s * (one + g * (one - s)), d * g * s

    if width == 1:

        @jit_dev
        def fwd(g, u):
            return st(act_mul(ld(g), ld(u)))

        @jit_dev
        def bwd(d, g, u):
            dg, du = grads(ld(d), ld(g), ld(u))
            return st(dg), st(du)

    elif width == 2:
        unpack, pack = vh.unpack2, vh.pack2

        @jit_dev
        def fwd(g, u):
            g0, g1 = unpack(g)
            u0, u1 = unpack(u)
            return pack(act_mul(g0, u0), act_mul(g1, u1))

        @jit_dev
        def bwd(d, g, u):
            d0, d1 = unpack(d)
            g0, g1 = unpack(g)
            u0, u1 = unpack(u)
            a0, b0 = grads(d0, g0, u0)
            a1, b1 = grads(d1, g1, u1)
            return pack(a0, a1), pack(b0, b1)

    else:
        unpack, pack = vh.unpack4, vh.pack4

        @jit_dev
        def fwd(g, u):
            g0, g1, g2, g3 = unpack(g)
            u0, u1, u2, u3 = unpack(u)
            return pack(act_mul(g0, u0), act_mul(g1, u1), act_mul(g2, u2), act_mul(g3, u3))

        @jit_dev
        def bwd(d, g, u):
            d0, d1, d2, d3 = unpack(d)
            g0, g1, g2, g3 = unpack(g)
            u0, u1, u2, u3 = unpack(u)
            a0, b0 = grads(d0, g0, u0)
            a1, b1 = grads(d1, g1, u1)
            a2, b2 = grads(d2, g2, u2)
            a3, b3 = grads(d3, g3, u3)
            return pack(a0, a1, a2, a3), pack(b0, b1, b2, b3)

    return fwd, bwd


@functools.cache
def _fwd_wide_kernel(width: int):
    global cuda
    cuda = get_cuda()
    fwd, _ = _word_fns(width)
    T = threads()

    @jit_kernel
    def kernel(gate, up, out):
        rows, nw = gate.shape  # words per row
        for r in range(cuda.blockIdx.x, rows, cuda.gridDim.x):
            for k0 in range(cuda.threadIdx.x, nw, UNROLL * T):
                k1 = k0 + T
                k2 = k1 + T
                k3 = k2 + T
                # every load before any store: UNROLL independent words in flight per thread
                g0 = gate[r, k0]
                u0 = up[r, k0]
                g1, u1, g2, u2, g3, u3 = g0, u0, g0, u0, g0, u0
                if k1 < nw:
                    g1 = gate[r, k1]
                    u1 = up[r, k1]
                if k2 < nw:
                    g2 = gate[r, k2]
                    u2 = up[r, k2]
                if k3 < nw:
                    g3 = gate[r, k3]
                    u3 = up[r, k3]
                out[r, k0] = fwd(g0, u0)
                if k1 < nw:
                    out[r, k1] = fwd(g1, u1)
                if k2 < nw:
                    out[r, k2] = fwd(g2, u2)
                if k3 < nw:
                    out[r, k3] = fwd(g3, u3)

    return kernel


@functools.cache
def _bwd_wide_kernel(width: int):
    global cuda
    cuda = get_cuda()
    _, bwd = _word_fns(width)
    T = threads()

    @jit_kernel
    def kernel(dout, gate, up, dgate, dup):
        rows, nw = gate.shape
        for r in range(cuda.blockIdx.x, rows, cuda.gridDim.x):
            for k0 in range(cuda.threadIdx.x, nw, UNROLL * T):
                k1 = k0 + T
                k2 = k1 + T
                k3 = k2 + T
                d0 = dout[r, k0]
                g0 = gate[r, k0]
                u0 = up[r, k0]
                d1, g1, u1, d2, g2, u2, d3, g3, u3 = d0, g0, u0, d0, g0, u0, d0, g0, u0
                if k1 < nw:
                    d1 = dout[r, k1]
                    g1 = gate[r, k1]
                    u1 = up[r, k1]
                if k2 < nw:
                    d2 = dout[r, k2]
                    g2 = gate[r, k2]
                    u2 = up[r, k2]
                if k3 < nw:
                    d3 = dout[r, k3]
                    g3 = gate[r, k3]
                    u3 = up[r, k3]
                a, b = bwd(d0, g0, u0)
                dgate[r, k0] = a
                dup[r, k0] = b
                if k1 < nw:
                    a, b = bwd(d1, g1, u1)
                    dgate[r, k1] = a
                    dup[r, k1] = b
                if k2 < nw:
                    a, b = bwd(d2, g2, u2)
                    dgate[r, k2] = a
                    dup[r, k2] = b
                if k3 < nw:
                    a, b = bwd(d3, g3, u3)
                    dgate[r, k3] = a
                    dup[r, k3] = b

    return kernel


def _width(*tensors: torch.Tensor) -> int:
    """Word width of the wide path (4 or 2 bf16, 1 for all-float32), 0 for the scalar path."""
    if all(t.dtype == torch.float32 for t in tensors):
        return 1
    w = vec_width(*tensors)
    return 0 if w == 1 else w


def _words(t: torch.Tensor, width: int) -> torch.Tensor:
    return t if width == 1 else word_view(t, width)


def _as2d(t: torch.Tensor) -> torch.Tensor:
    if t.stride(-1) != 1:
        raise ValueError(f"last dimension must be contiguous, got strides {t.stride()}")
    return t if t.dim() == 2 else t.view(-1, t.shape[-1])


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor, out: torch.Tensor) -> None:
    """out = silu(gate) * up; all [..., cols], float32 or bfloat16 (views with a contiguous last dim are fine)."""
    g2, u2, o2 = _as2d(gate), _as2d(up), _as2d(out)
    width = _width(g2, u2, o2)
    if width:
        kernel = _fwd_wide_kernel(width)
        g2, u2, o2 = (_words(t, width) for t in (g2, u2, o2))
    else:
        kernel = _fwd_kernel(gate.dtype, up.dtype, out.dtype)
    launch(kernel, grid_for(g2.shape[0], 1), threads(), g2, u2, o2)


def swiglu_backward(
    dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, dgate: torch.Tensor, dup: torch.Tensor
) -> None:
    """dgate (gate's dtype), dup (up's dtype) from dout; silu is recomputed from gate, nothing else is saved."""
    ts = tuple(_as2d(t) for t in (dout, gate, up, dgate, dup))
    width = _width(*ts)
    if width:
        kernel = _bwd_wide_kernel(width)
        ts = tuple(_words(t, width) for t in ts)
    else:
        kernel = _bwd_kernel(dout.dtype, gate.dtype, up.dtype)
    launch(kernel, grid_for(ts[1].shape[0], 1), threads(), *ts)
