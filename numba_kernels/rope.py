"""Rotary position embedding (rotate-half convention of HF Llama/Qwen), forward and backward.

Math (the definition): for head vector x of size D, half = D/2, angle_j = pos * inv_freq[j] (fp32),
    out[j]        = x[j] * cos_j - x[j + half] * sin_j
    out[j + half] = x[j + half] * cos_j + x[j] * sin_j
with cos/sin scaled by the rope type's attention_scaling. Backward is the transposed rotation (sin -> -sin).
Positions are per token (`position_ids[T]`), so packed sequences restart their positions freely.
Two sources of cos/sin: precomputed fp32 tables [max_pos, half] (`rope_tables_ref`), or, with
`use_fused_rope`, computed on the fly from `inv_freq[half]` (no table in memory).
x: [T, H, D] (a view with a contiguous last dim, e.g. the q/k heads of a packed qkv buffer); out may be x.
"""

from __future__ import annotations

import functools
import math

import torch

from ._device import converters, get_cuda, grid_for, jit_kernel, launch, threads

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


@functools.cache
def _kernel(x_dt: torch.dtype, o_dt: torch.dtype, fused: bool):
    global cuda  # a module global: the simulator swaps `cuda` in kernels' globals at launch
    cuda = get_cuda()
    from numba import float32, int32

    lx, _ = converters(x_dt)
    _, so = converters(o_dt)
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
            for j in range(tid, half, T):  # this token's cos/sin, once for all its heads
                if fused:
                    ang = float32(p) * inv_freq[j]
                    c = float32(math.cos(ang)) * float32(scaling)
                    s = float32(math.sin(ang)) * float32(scaling)
                else:
                    c = cos_t[p, j]
                    s = sin_t[p, j]
                sc[j] = c
                ss[j] = s * float32(sign)
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


def _launch(x, out, position_ids, cos, sin, inv_freq, attention_scaling, sign) -> None:
    if x.dim() != 3 or x.stride(-1) != 1 or out.shape != x.shape or out.stride(-1) != 1:
        raise ValueError(f"rope needs x and out [T, H, D] with a contiguous last dim, got {tuple(x.shape)}")
    if x.shape[-1] % 2 or x.shape[-1] > 2 * MAX_HALF:
        raise ValueError(f"rope head_dim must be even and at most {2 * MAX_HALF}, got {x.shape[-1]}")
    fused = inv_freq is not None
    kernel = _kernel(x.dtype, out.dtype, fused)
    dummy = inv_freq if fused else cos
    launch(
        kernel,
        grid_for(x.shape[0], 1),
        threads(),
        x,
        out,
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
