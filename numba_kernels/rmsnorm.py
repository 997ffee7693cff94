"""RMSNorm forward/backward with optional fused residual add.

Math (the definition; HF `LlamaRMSNorm` / `Qwen3RMSNorm`):
    s    = x + residual                  (in the input dtype, as HF adds the residual stream)
    rstd = 1 / sqrt(mean(s_f32^2) + eps)  (fp32)
    out  = weight * (s_f32 * rstd).to(input dtype)
Backward, with xhat = s * rstd and g = dy * weight (fp32):
    ds = rstd * (g - xhat * mean(g * xhat)) (+ the gradient already flowing into s, if given)
    dweight = sum_rows(dy * xhat)
Kernels: forward is one block per row (two passes over the row, the second hits cache); backward writes
per-block partial dweight rows into a caller workspace and a column kernel sums them (deterministic).
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
    threads,
)

cuda = None  # numba.cuda, bound by the first kernel build (lazy import)

# ---------------------------------------------------------------- reference


def rmsnorm_forward_ref(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Returns (out, rstd[rows] fp32, summed or None); leading dims of x are flattened for rstd."""
    s = x + residual if residual is not None else x
    sf = s.float()
    rstd = torch.rsqrt(sf.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * (sf * rstd).to(x.dtype)
    return out, rstd.reshape(-1), (s if residual is not None else None)


def rmsnorm_backward_ref(
    dy: torch.Tensor,
    s: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    dresidual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (ds in s.dtype, dweight in weight.dtype); `s` is the normalised input (x + residual)."""
    h = s.shape[-1]
    sf = s.float().reshape(-1, h)
    dyf = dy.float().reshape(-1, h)
    r = rstd.float().reshape(-1, 1)
    xhat = sf * r
    g = dyf * weight.float()
    dot = (g * xhat).sum(-1, keepdim=True) / h
    ds = r * (g - xhat * dot)
    if dresidual is not None:
        ds = ds + dresidual.float().reshape(-1, h)
    dw = (dyf * xhat).sum(0)
    return ds.to(s.dtype).reshape(s.shape), dw.to(weight.dtype)


# ---------------------------------------------------------------- kernels


def row_threads(hidden: int) -> int:
    """Threads per row-block: 128 for short rows (e.g. Qwen3's per-head q/k norm, hidden 128), else 256."""
    t = threads()
    return t // 2 if hidden <= t // 2 else t


@functools.cache
def _fwd_kernel(x_dt: torch.dtype, w_dt: torch.dtype, o_dt: torch.dtype, has_res: bool, T: int):
    global cuda  # a module global: the simulator swaps `cuda` in kernels' globals at launch
    cuda = get_cuda()
    from numba import float32

    h = helpers()
    lx, sx = converters(x_dt)
    lw, _ = converters(w_dt)
    _, so = converters(o_dt)
    block_sum = h.block_sum

    @jit_kernel
    def kernel(x, res, w, out, sum_out, rstd, eps):
        sm = cuda.shared.array(T, float32)
        tid = cuda.threadIdx.x
        rows, hidden = x.shape
        for row in range(cuda.blockIdx.x, rows, cuda.gridDim.x):
            acc = float32(0.0)
            for c in range(tid, hidden, T):
                v = lx(x[row, c])
                if has_res:
                    sv = sx(v + lx(res[row, c]))  # the residual add rounds to the input dtype, as in HF
                    sum_out[row, c] = sv
                    v = lx(sv)
                acc += v * v
            total = block_sum(sm, acc)
            r = float32(1.0) / math.sqrt(float32(total / float32(hidden)) + float32(eps))
            if tid == 0:
                rstd[row] = r
            for c in range(tid, hidden, T):
                if has_res:
                    v = lx(sum_out[row, c])
                else:
                    v = lx(x[row, c])
                y = lx(sx(v * r))  # HF casts the normalised value back to the input dtype first
                out[row, c] = so(lw(w[c]) * y)

    return kernel


@functools.cache
def _bwd_kernel(dy_dt: torch.dtype, s_dt: torch.dtype, w_dt: torch.dtype, has_dres: bool, T: int):
    global cuda  # a module global: the simulator swaps `cuda` in kernels' globals at launch
    cuda = get_cuda()
    from numba import float32

    h = helpers()
    ldy, _ = converters(dy_dt)
    ls, ss = converters(s_dt)
    lw, _ = converters(w_dt)
    block_sum = h.block_sum

    @jit_kernel
    def kernel(dy, s, w, rstd, dres, ds, dw_part):
        sm = cuda.shared.array(T, float32)
        tid = cuda.threadIdx.x
        b = cuda.blockIdx.x
        rows, hidden = s.shape
        for c in range(tid, hidden, T):
            dw_part[b, c] = float32(0.0)
        for row in range(b, rows, cuda.gridDim.x):
            r = rstd[row]
            acc = float32(0.0)
            for c in range(tid, hidden, T):
                acc += ldy(dy[row, c]) * lw(w[c]) * (ls(s[row, c]) * r)
            dot = block_sum(sm, acc) / float32(hidden)
            for c in range(tid, hidden, T):
                g = ldy(dy[row, c])
                xhat = ls(s[row, c]) * r
                v = r * (g * lw(w[c]) - xhat * dot)
                if has_dres:
                    v += ls(dres[row, c])
                ds[row, c] = ss(v)
                dw_part[b, c] += g * xhat

    return kernel


@functools.cache
def _colsum_kernel(o_dt: torch.dtype):
    """dweight[c] = sum_b part[b, c]: one thread per column, coalesced across the row of partials."""
    global cuda  # a module global: the simulator swaps `cuda` in kernels' globals at launch
    cuda = get_cuda()
    from numba import float32

    _, so = converters(o_dt)

    @jit_kernel
    def kernel(part, out):
        nb, n = part.shape
        start, stride = cuda.grid(1), cuda.gridsize(1)
        for c in range(start, n, stride):
            acc = float32(0.0)
            for b in range(nb):
                acc += part[b, c]
            out[c] = so(acc)

    return kernel


def colsum(part: torch.Tensor, out: torch.Tensor) -> None:
    """out[c] = sum over rows of the fp32 partials `part[b, c]` (deterministic order)."""
    launch(_colsum_kernel(out.dtype), grid_for(part.shape[1], threads()), threads(), part, out)


# ---------------------------------------------------------------- launchers


def rmsnorm_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    out: torch.Tensor,
    rstd: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    sum_out: torch.Tensor | None = None,
) -> None:
    """out = RMSNorm(x [+ residual]) * weight; rstd[rows] (fp32) saved for backward; sum_out gets x + residual.

    x, residual, out, sum_out: [..., hidden] contiguous, float32 or bfloat16. With `residual`, `sum_out`
    is required (it is the next residual stream and the input the backward needs).
    """
    hidden = x.shape[-1]
    for name, t in (("x", x), ("out", out), ("residual", residual), ("sum_out", sum_out)):
        if t is not None:
            check_contiguous(name, t)
    has_res = residual is not None
    if has_res and sum_out is None:
        raise ValueError("rmsnorm_forward with residual needs sum_out")
    x2 = x.reshape(-1, hidden)
    rows = x2.shape[0]
    res2 = residual.reshape(-1, hidden) if has_res else x2
    sum2 = sum_out.reshape(-1, hidden) if has_res else x2
    t = row_threads(hidden)
    kernel = _fwd_kernel(x.dtype, weight.dtype, out.dtype, has_res, t)
    launch(kernel, grid_for(rows, 1), t, x2, res2, weight, out.reshape(-1, hidden), sum2, rstd, float(eps))


def rmsnorm_bwd_workspace_shape(rows: int) -> tuple[int, int]:
    """Rows of the fp32 dweight-partials workspace the backward needs (times hidden columns)."""
    return (grid_for(rows, 1), -1)


def rmsnorm_backward(
    dy: torch.Tensor,
    s: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    ds: torch.Tensor,
    dweight: torch.Tensor,
    dresidual: torch.Tensor | None = None,
    workspace: torch.Tensor | None = None,
) -> None:
    """ds = d(loss)/d(s) (+ dresidual), dweight = sum over rows; `s` is the normalised input (x + residual).

    `workspace` is fp32 [blocks, hidden] (see `rmsnorm_bwd_workspace_shape`); allocated here if omitted,
    which a static plan should avoid.
    """
    hidden = s.shape[-1]
    for name, t in (("dy", dy), ("s", s), ("ds", ds), ("dresidual", dresidual)):
        if t is not None:
            check_contiguous(name, t)
    s2 = s.reshape(-1, hidden)
    rows = s2.shape[0]
    blocks = grid_for(rows, 1)
    if workspace is None:
        workspace = torch.empty((blocks, hidden), dtype=torch.float32, device=s.device)
    if workspace.dtype != torch.float32 or workspace.shape[1] != hidden:
        raise ValueError(f"workspace must be float32 [>= {blocks}, {hidden}], got {tuple(workspace.shape)}")
    blocks = min(blocks, workspace.shape[0])
    part = workspace[:blocks]
    has_dres = dresidual is not None
    dres2 = dresidual.reshape(-1, hidden) if has_dres else s2
    t = row_threads(hidden)
    kernel = _bwd_kernel(dy.dtype, s.dtype, weight.dtype, has_dres, t)
    launch(kernel, blocks, t, dy.reshape(-1, hidden), s2, weight, rstd, dres2, ds.reshape(-1, hidden), part)
    colsum(part, dweight)
