"""Rotary position embedding (rotate-half convention of HF Llama/Qwen), forward and backward.

Math (the definition): for head vector x of size D, half = D/2, angle_j = pos * inv_freq[j] (fp32),
    out[j]        = x[j] * cos_j - x[j + half] * sin_j
    out[j + half] = x[j + half] * cos_j + x[j] * sin_j
with cos/sin scaled by the rope type's attention_scaling. Backward is the transposed rotation (sin -> -sin).
Positions are per token (`position_ids[T]`), so packed sequences restart their positions freely.
Two sources of cos/sin: precomputed fp32 tables [max_pos, half] (`rope_tables_ref`), or, with
`use_fused_rope`, computed on the fly from `inv_freq[half]` (no table in memory).
x: [T, H, D] (a view with a contiguous last dim, e.g. the q/k heads of a packed qkv buffer); out may be x.

Wide path (`_wide_kernel`): each thread rotates UNROLL independent (x1, x2) word pairs per iteration (loads
before stores), a word being 4 bf16 (int64 view), 2 bf16 (int32 view) or one float32: x and out bfloat16 with
half % 4 (or 2) == 0 and aligned views (`_vec.word_view`), or both float32. Otherwise (mixed dtypes, odd
half, misaligned views) the scalar kernel. Same float32 math, same bits.
"""

from __future__ import annotations

import functools
import math

import torch

from ._device import converters, get_cuda, grid_for, jit_kernel, launch, threads
from ._vec import vec_helpers, vec_width, word_view

cuda = None  # numba.cuda, bound by the first kernel build (lazy import)


def rope_tables_ref(
    inv_freq: torch.Tensor, max_positions: int, attention_scaling: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) fp32 [max_positions, D/2], as HF's rotary embedding computes them (before any dtype cast)."""
    pos = torch.arange(max_positions, dtype=torch.float32, device=inv_freq.device)
    freqs = pos[:, None] * inv_freq.float()[None, :]
    return freqs.cos() * attention_scaling, freqs.sin() * attention_scaling


def rope_forward_ref(
    x: torch.Tensor,
    position_ids: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    backward: bool = False,
) -> torch.Tensor:
    """Rotate x [T, H, D] by the table rows of `position_ids` [T]; `backward` applies the inverse rotation."""
    half = x.shape[-1] // 2
    c = cos.float()[position_ids.long()][:, None, :]
    s = sin.float()[position_ids.long()][:, None, :]
    if backward:
        s = -s
    xf = x.float()
    x1, x2 = xf[..., :half], xf[..., half:]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)


def rope_fused_ref(
    x: torch.Tensor,
    position_ids: torch.Tensor,
    inv_freq: torch.Tensor,
    attention_scaling: float = 1.0,
    backward: bool = False,
) -> torch.Tensor:
    """Same as `rope_forward_ref` with cos/sin computed from positions and inv_freq (fp32)."""
    freqs = position_ids.float()[:, None] * inv_freq.float()[None, :]
    cos, sin = freqs.cos() * attention_scaling, freqs.sin() * attention_scaling
    rows = torch.arange(position_ids.numel())
    return rope_forward_ref(x, rows, cos, sin, backward)


MAX_HALF = 256  # head_dim up to 512: cos/sin of one token live in shared memory
UNROLL = 2  # (x1, x2) word pairs per thread per iteration on the wide path


@functools.cache
def _token_tables(fused: bool):
    """Device function: one token's cos/sin (sin times `sign`) into the shared arrays, once for all its heads;
    from the tables, or computed from inv_freq (`fused`). Shared by the scalar and the wide kernels."""
    global cuda
    cuda = get_cuda()
    from numba import float32

    T = threads()

    @cuda.jit(device=True, inline="always")
    def fill(sc, ss, p, cos_t, sin_t, inv_freq, scaling, sign, half):
        for j in range(cuda.threadIdx.x, half, T):
            if fused:
                ang = float32(p) * inv_freq[j]
                c = float32(math.cos(ang)) * float32(scaling)
                s = float32(math.sin(ang)) * float32(scaling)
            else:
                c = cos_t[p, j]
                s = sin_t[p, j]
            sc[j] = c
            ss[j] = s * float32(sign)

    return fill


@functools.cache
def _kernel(x_dt: torch.dtype, o_dt: torch.dtype, fused: bool):
    global cuda  # a module global: the simulator swaps `cuda` in kernels' globals at launch
    cuda = get_cuda()
    from numba import float32, int32

    lx, _ = converters(x_dt)
    _, so = converters(o_dt)
    fill = _token_tables(fused)
    T = threads()

    @jit_kernel
    def kernel(x, out, pos, cos_t, sin_t, inv_freq, scaling, sign):
        sc = cuda.shared.array(MAX_HALF, float32)
        ss = cuda.shared.array(MAX_HALF, float32)
        tid = cuda.threadIdx.x
        n_tok, n_heads, d = x.shape
        half = int32(d // 2)
        for t in range(cuda.blockIdx.x, n_tok, cuda.gridDim.x):  # a block per token
            p = pos[t]
            fill(sc, ss, p, cos_t, sin_t, inv_freq, scaling, sign, half)
            cuda.syncthreads()
            for k in range(tid, n_heads * half, T):
                h = int32(k) // half  # 32-bit division: 64-bit division is emulated and slow
                j = int32(k) - h * half
                c = sc[j]
                s = ss[j]
                x1 = lx(x[t, h, j])
                x2 = lx(x[t, h, j + half])
                out[t, h, j] = so(x1 * c - x2 * s)
                out[t, h, j + half] = so(x2 * c + x1 * s)
            cuda.syncthreads()  # sc/ss are rewritten for the next token

    return kernel


def _rotate_fn(width: int):
    """rot(x1, x2, sc, ss, j) -> (out1, out2) on one word of each half: `width` packed bf16 (4 or 2) with
    cos/sin sc[j + i], ss[j + i] for element i, or one float32 (width 1). The scalar kernel's math.

    The second output is an explicit `cuda.fma(x1, s, x2 * c)`: on a GPU, NVVM contracts the scalar kernel's
    `x2 * c + x1 * s` into exactly that (checked in its sm_90 PTX), but which product it fuses depends on the
    surrounding code (here it fused the other one), and the two round differently. The first output,
    `x1 * c - x2 * s`, is not contracted in either kernel (two products and a subtraction)."""
    global cuda  # a module global: the simulator swaps `cuda` in device functions' globals too
    cuda = get_cuda()
    jit_dev = cuda.jit(device=True, inline="always")
    if width == 1:
        ld, st = converters(torch.float32)

        @jit_dev
        def rot(x1, x2, sc, ss, j):
            a = ld(x1)
            b = ld(x2)
            c = sc[j]
            s = ss[j]
            return st(a * c - b * s), st(cuda.fma(a, s, b * c))

        return rot
    vh = vec_helpers()
    if width == 2:
        unpack, pack = vh.unpack2, vh.pack2

        @jit_dev
        def rot(x1, x2, sc, ss, j):
            a0, a1 = unpack(x1)
            b0, b1 = unpack(x2)
            c0, c1 = sc[j], sc[j + 1]
            s0, s1 = ss[j], ss[j + 1]
            return (pack(a0 * c0 - b0 * s0, a1 * c1 - b1 * s1),
                    pack(cuda.fma(a0, s0, b0 * c0), cuda.fma(a1, s1, b1 * c1)))

        return rot
    unpack, pack = vh.unpack4, vh.pack4

    @jit_dev
    def rot(x1, x2, sc, ss, j):
        a0, a1, a2, a3 = unpack(x1)
        b0, b1, b2, b3 = unpack(x2)
        c0, c1, c2, c3 = sc[j], sc[j + 1], sc[j + 2], sc[j + 3]
        s0, s1, s2, s3 = ss[j], ss[j + 1], ss[j + 2], ss[j + 3]
        return (pack(a0 * c0 - b0 * s0, a1 * c1 - b1 * s1, a2 * c2 - b2 * s2, a3 * c3 - b3 * s3),
                pack(cuda.fma(a0, s0, b0 * c0), cuda.fma(a1, s1, b1 * c1), cuda.fma(a2, s2, b2 * c2),
                     cuda.fma(a3, s3, b3 * c3)))

    return rot


@functools.cache
def _wide_kernel(width: int, fused: bool):
    global cuda
    cuda = get_cuda()
    from numba import float32, int32

    rot = _rotate_fn(width)
    fill = _token_tables(fused)
    T = threads()
    W = width

    @jit_kernel
    def kernel(x, out, pos, cos_t, sin_t, inv_freq, scaling, sign):
        sc = cuda.shared.array(MAX_HALF, float32)
        ss = cuda.shared.array(MAX_HALF, float32)
        tid = cuda.threadIdx.x
        n_tok, n_heads, nw = x.shape  # nw words per head
        hw = int32(nw // 2)  # words per half
        half = hw * int32(W)
        n_items = int32(n_heads) * hw
        # item k = (head k // hw, word k % hw): the divisions once per thread, then carried as (head, word)
        # steps (numba types int32 // int32 as int64: an emulated 64-bit division per item otherwise)
        h_first = int32(tid) // hw
        w_first = int32(tid) - h_first * hw
        dh1 = int32(T) // hw  # item k + T
        dw1 = int32(T) - dh1 * hw
        dh2 = int32(UNROLL * T) // hw  # next iteration: k + UNROLL * T
        dw2 = int32(UNROLL * T) - dh2 * hw
        for t in range(cuda.blockIdx.x, n_tok, cuda.gridDim.x):  # a block per token
            p = pos[t]
            fill(sc, ss, p, cos_t, sin_t, inv_freq, scaling, sign, half)
            cuda.syncthreads()
            h0 = h_first
            w0 = w_first
            for k0 in range(tid, n_items, UNROLL * T):
                k1 = int32(k0 + T)
                h1 = h0 + dh1
                w1 = w0 + dw1
                if w1 >= hw:
                    w1 -= hw
                    h1 += int32(1)
                # both pairs' loads before any store (out may alias x: each thread writes what it read)
                a0 = x[t, h0, w0]
                b0 = x[t, h0, w0 + hw]
                a1, b1 = a0, b0
                if k1 < n_items:
                    a1 = x[t, h1, w1]
                    b1 = x[t, h1, w1 + hw]
                o1, o2 = rot(a0, b0, sc, ss, w0 * int32(W))
                out[t, h0, w0] = o1
                out[t, h0, w0 + hw] = o2
                if k1 < n_items:
                    o1, o2 = rot(a1, b1, sc, ss, w1 * int32(W))
                    out[t, h1, w1] = o1
                    out[t, h1, w1 + hw] = o2
                h0 += dh2
                w0 += dw2
                if w0 >= hw:
                    w0 -= hw
                    h0 += int32(1)
            cuda.syncthreads()  # sc/ss are rewritten for the next token

    return kernel


def _width(x: torch.Tensor, out: torch.Tensor) -> int:
    """Word width of the wide path (4 or 2 bf16 a word, 1 for float32), 0 for the scalar kernel. A word must
    not straddle the two halves: half % width == 0."""
    half = x.shape[-1] // 2
    if half == 0:
        return 0
    if x.dtype == out.dtype == torch.float32:
        return 1
    w = vec_width(x, out, widths=tuple(w for w in (4, 2) if half % w == 0))
    return 0 if w == 1 else w


def _launch(x, out, position_ids, cos, sin, inv_freq, attention_scaling, sign) -> None:
    if x.dim() != 3 or x.stride(-1) != 1 or out.shape != x.shape or out.stride(-1) != 1:
        raise ValueError(f"rope needs x and out [T, H, D] with a contiguous last dim, got {tuple(x.shape)}")
    if x.shape[-1] % 2 or x.shape[-1] > 2 * MAX_HALF:
        raise ValueError(f"rope head_dim must be even and at most {2 * MAX_HALF}, got {x.shape[-1]}")
    fused = inv_freq is not None
    width = _width(x, out)
    if width:
        kernel = _wide_kernel(width, fused)
        xa, oa = (x, out) if width == 1 else (word_view(x, width), word_view(out, width))
    else:
        kernel = _kernel(x.dtype, out.dtype, fused)
        xa, oa = x, out
    dummy = inv_freq if fused else cos
    launch(
        kernel,
        grid_for(x.shape[0], 1),
        threads(),
        xa,
        oa,
        position_ids,
        cos if not fused else dummy.view(1, -1),
        sin if not fused else dummy.view(1, -1),
        inv_freq if fused else dummy.reshape(-1),
        float(attention_scaling),
        float(sign),
    )


def rope_forward(
    x: torch.Tensor, out: torch.Tensor, position_ids: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> None:
    """out = rope(x) with fp32 tables cos/sin [max_pos, D/2]; position_ids [T] int32/int64; out may alias x.

    Positions must be below max_pos (not checked on the device: that would need a host sync).
    """
    _launch(x, out, position_ids, cos, sin, None, 1.0, 1.0)


def rope_backward(
    dout: torch.Tensor, dx: torch.Tensor, position_ids: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> None:
    """dx = rope^T(dout) (the inverse rotation); dx may alias dout."""
    _launch(dout, dx, position_ids, cos, sin, None, 1.0, -1.0)


def rope_fused_forward(
    x: torch.Tensor,
    out: torch.Tensor,
    position_ids: torch.Tensor,
    inv_freq: torch.Tensor,
    attention_scaling: float = 1.0,
) -> None:
    """`use_fused_rope`: cos/sin computed on the fly from position_ids and fp32 inv_freq [D/2]."""
    _launch(x, out, position_ids, None, None, inv_freq, attention_scaling, 1.0)


def rope_fused_backward(
    dout: torch.Tensor,
    dx: torch.Tensor,
    position_ids: torch.Tensor,
    inv_freq: torch.Tensor,
    attention_scaling: float = 1.0,
) -> None:
    """Backward of `rope_fused_forward` (inverse rotation, cos/sin recomputed)."""
    _launch(dout, dx, position_ids, None, None, inv_freq, attention_scaling, -1.0)
