"""SwiGLU forward/backward: out = silu(gate) * up.

Math (the definition; HF `act_fn(gate_proj(x)) * up_proj(x)`): silu is computed in fp32 and rounded to
the storage dtype, then multiplied by `up` (as torch does in bf16). Backward, with sg = sigmoid(gate):
    dgate = dout * up * sg * (1 + gate * (1 - sg)),   dup = dout * silu(gate)
Grid-stride over rows (a block per row, threads across columns: coalesced, no index division); gate/up/out may be strided views (e.g. the two halves
of a fused [rows, 2 * cols] gate_up buffer) as long as the last dimension is contiguous.
"""

from __future__ import annotations

import functools
import math

import torch

from ._device import converters, get_cuda, grid_for, jit_kernel, launch, threads

cuda = None  # numba.cuda, bound by the first kernel build (lazy import)


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


def _as2d(t: torch.Tensor) -> torch.Tensor:
    if t.stride(-1) != 1:
        raise ValueError(f"last dimension must be contiguous, got strides {t.stride()}")
    return t if t.dim() == 2 else t.view(-1, t.shape[-1])


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor, out: torch.Tensor) -> None:
    """out = silu(gate) * up; all [..., cols], float32 or bfloat16 (views with a contiguous last dim are fine)."""
    g2, u2, o2 = _as2d(gate), _as2d(up), _as2d(out)
    kernel = _fwd_kernel(gate.dtype, up.dtype, out.dtype)
    launch(kernel, grid_for(g2.shape[0], 1), threads(), g2, u2, o2)


def swiglu_backward(
    dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, dgate: torch.Tensor, dup: torch.Tensor
) -> None:
    """dgate (gate's dtype), dup (up's dtype) from dout; silu is recomputed from gate, nothing else is saved."""
    g2 = _as2d(gate)
    kernel = _bwd_kernel(dout.dtype, gate.dtype, up.dtype)
    launch(kernel, grid_for(g2.shape[0], 1), threads(), _as2d(dout), g2, _as2d(up), _as2d(dgate), _as2d(dup))
