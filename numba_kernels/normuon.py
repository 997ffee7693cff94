"""NorMuon's element-wise parts: momentum, neuron-wise second moment and normalisation, cautious weight decay.

Math (the definition; NorMuon, Li et al. 2025, reference code `normuon_update` + its step), for a 2-D
weight W [rows, cols] with gradient G, momentum M and a per-row second moment v [rows]:
    M = lerp(M, G, 1 - beta);  U = lerp(G, M, beta) if nesterov else M          (momentum kernel)
    O = NewtonSchulz5(U)                                                         (GEMMs, torch; not here)
    q_i = sum_j O_ij^2;  v_i = lerp(v_i, q_i / cols, 1 - beta2)                 (row kernel)
    s = ||O||_F / (||O / (sqrt(v) + 1e-10)||_F + 1e-10) * sqrt(max(1, rows / cols))   (scale kernel, one block)
    D_ij = O_ij / (sqrt(v_i) + 1e-10) * s
    W = W * (1 - lr * wd * mask) - lr * D,  mask = [G_ij * M_ij > 0] if cautious else 1   (apply kernel)
Cautious weight decay (`normuon_cautious_wd`, configuration.md: "only applies decay when gradient and
momentum align") decays only coordinates where the gradient and the (updated, stored) momentum have the
same sign; elsewhere the coordinate gets the update alone.
lr and wd travel in a fp32 device tensor [lr, wd]; s stays on the device (no host sync, graph-capturable).
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
    zeros1,
)

cuda = None  # numba.cuda, bound by the first kernel build (lazy import)

EPS = 1e-10


# ---------------------------------------------------------------- reference


def newton_schulz5_ref(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Muon's quintic Newton-Schulz orthogonalisation (bf16 matmuls, as in the reference code)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.bfloat16()
    transposed = g.size(-2) > g.size(-1)
    if transposed:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        am = x @ x.mT
        bm = b * am + c * am @ am
        x = a * x + bm @ x
    return x.mT if transposed else x


def normuon_momentum_ref(grad: torch.Tensor, momentum: torch.Tensor, beta: float, nesterov: bool = True):
    """(new momentum, update) as fp32."""
    m = momentum.float().lerp(grad.float(), 1 - beta)
    u = grad.float().lerp(m, beta) if nesterov else m
    return m, u


def normuon_normalise_ref(o: torch.Tensor, v: torch.Tensor, beta2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(update D fp32, new v) from the orthogonalised O and the row second moment v."""
    of = o.float()
    rows, cols = of.shape
    v_new = v.float().lerp((of * of).mean(dim=-1), 1 - beta2)
    d = of / (v_new.sqrt()[:, None] + EPS)
    scale = of.norm() / (d.norm() + EPS) * math.sqrt(max(1.0, rows / cols))
    return d * scale, v_new


def cautious_mask(grad: torch.Tensor, momentum: torch.Tensor) -> torch.Tensor:
    """1.0 where gradient and momentum align (same sign, both non-zero), else 0.0 (fp32)."""
    return (grad.float() * momentum.float() > 0).float()


def normuon_apply_ref(param: torch.Tensor, d: torch.Tensor, lr: float, wd: float, cautious: bool,
                      grad: torch.Tensor | None = None, momentum: torch.Tensor | None = None) -> torch.Tensor:
    """W * (1 - lr * wd * mask) - lr * D, returned in param's dtype; mask = [grad * momentum > 0] if cautious."""
    p = param.float()
    if cautious:
        _need_grad_momentum(grad, momentum)
        mask = cautious_mask(grad, momentum).reshape(p.shape)
    else:
        mask = torch.ones_like(p)
    return (p * (1 - lr * wd * mask) - lr * d).to(param.dtype)


def _need_grad_momentum(grad: torch.Tensor | None, momentum: torch.Tensor | None) -> None:
    if grad is None or momentum is None:
        raise ValueError("cautious weight decay needs the gradient and the momentum (mask = grad * momentum > 0)")


# ---------------------------------------------------------------- kernels


@functools.cache
def _momentum_kernel(g_dt: torch.dtype, m_dt: torch.dtype, u_dt: torch.dtype, nesterov: bool):
    global cuda  # a module global: the simulator swaps `cuda` in kernels' globals at launch
    cuda = get_cuda()
    from numba import float32

    lg, _ = converters(g_dt)
    lm, sm_ = converters(m_dt)
    _, su = converters(u_dt)

    @jit_kernel
    def kernel(grad, mom, upd, beta):
        b = float32(beta)
        for i in range(cuda.grid(1), grad.shape[0], cuda.gridsize(1)):
            g = lg(grad[i])
            m = lm(mom[i])
            m = m + (float32(1.0) - b) * (g - m)  # torch.lerp's form for weights below 0.5
            mom[i] = sm_(m)
            if nesterov:
                upd[i] = su(m - (m - g) * (float32(1.0) - b))  # torch.lerp(g, m, beta), beta >= 0.5
            else:
                upd[i] = su(m)

    return kernel


@functools.cache
def _row_kernel(o_dt: torch.dtype):
    global cuda
    cuda = get_cuda()
    from numba import float32

    lo, _ = converters(o_dt)
    block_sum = helpers().block_sum
    T = threads()

    @jit_kernel
    def kernel(o, v, rowsq, beta2):
        sm = cuda.shared.array(T, float32)
        rows, cols = o.shape
        w = float32(1.0) - float32(beta2)
        for r in range(cuda.blockIdx.x, rows, cuda.gridDim.x):
            acc = float32(0.0)
            for c in range(cuda.threadIdx.x, cols, T):
                x = lo(o[r, c])
                acc += x * x
            q = block_sum(sm, acc)
            if cuda.threadIdx.x == 0:
                rowsq[r] = q
                v[r] = v[r] + w * (q / float32(cols) - v[r])

    return kernel


@functools.cache
def _scale_kernel():
    global cuda
    cuda = get_cuda()
    from numba import float32

    block_sum = helpers().block_sum
    T = threads()

    @jit_kernel
    def kernel(rowsq, v, cols, scale):
        sm = cuda.shared.array(T, float32)
        rows = v.shape[0]
        a = float32(0.0)
        b = float32(0.0)
        for r in range(cuda.threadIdx.x, rows, T):
            q = rowsq[r]
            den = float32(math.sqrt(v[r])) + float32(EPS)
            a += q
            b += q / (den * den)
        ta = block_sum(sm, a)
        tb = block_sum(sm, b)
        if cuda.threadIdx.x == 0:
            aspect = float32(math.sqrt(max(float32(1.0), float32(rows) / float32(cols))))
            scale[0] = float32(math.sqrt(ta)) / (float32(math.sqrt(tb)) + float32(EPS)) * aspect

    return kernel


@functools.cache
def _apply_kernel(p_dt: torch.dtype, o_dt: torch.dtype, g_dt: torch.dtype, m_dt: torch.dtype, cautious: bool):
    global cuda
    cuda = get_cuda()
    from numba import float32

    lp, sp = converters(p_dt)
    lo, _ = converters(o_dt)
    lg, _ = converters(g_dt)
    lm, _ = converters(m_dt)

    T = threads()

    @jit_kernel
    def kernel(param, o, v, scale, hp, grad, mom):
        rows, cols = param.shape
        s = scale[0]
        lr = hp[0]
        wd = hp[1]
        for r in range(cuda.blockIdx.x, rows, cuda.gridDim.x):  # a block per row: v[r] read once
            den = float32(math.sqrt(v[r])) + float32(EPS)
            for c in range(cuda.threadIdx.x, cols, T):
                d = lo(o[r, c]) / den * s
                p = lp(param[r, c])
                decay = lr * wd
                # cautious: decay only where gradient and momentum align (grad/mom unread otherwise)
                if cautious and not (lg(grad[r, c]) * lm(mom[r, c]) > float32(0.0)):
                    decay = float32(0.0)
                param[r, c] = sp(p * (float32(1.0) - decay) - lr * d)

    return kernel


# ---------------------------------------------------------------- launchers


def normuon_momentum(
    grad: torch.Tensor, momentum: torch.Tensor, update: torch.Tensor, beta: float, nesterov: bool = True
) -> None:
    """momentum <- lerp(momentum, grad, 1 - beta); update <- Nesterov lookahead (or the momentum)."""
    for name, t in (("grad", grad), ("momentum", momentum), ("update", update)):
        check_contiguous(name, t)
    n = grad.numel()
    kernel = _momentum_kernel(grad.dtype, momentum.dtype, update.dtype, bool(nesterov))
    launch(kernel, grid_for(n, threads()), threads(), grad.view(-1), momentum.view(-1), update.view(-1), float(beta))


def normuon_normalise(o: torch.Tensor, v: torch.Tensor, rowsq: torch.Tensor, scale: torch.Tensor, beta2: float) -> None:
    """Row second moment v [rows] (fp32, updated), row sums of squares rowsq [rows] and the scale s [1]."""
    check_contiguous("o", o)
    rows, cols = o.shape
    launch(_row_kernel(o.dtype), grid_for(rows, 1), threads(), o, v, rowsq, float(beta2))
    launch(_scale_kernel(), 1, threads(), rowsq, v, int(cols), scale)


def normuon_apply(
    param: torch.Tensor, o: torch.Tensor, v: torch.Tensor, scale: torch.Tensor, hp: torch.Tensor, cautious: bool = True,
    grad: torch.Tensor | None = None, momentum: torch.Tensor | None = None,
) -> None:
    """param <- param * (1 - lr * wd * mask) - lr * o / (sqrt(v) + eps) * s; hp = fp32 [lr, wd] on the device.

    mask = [grad * momentum > 0] elementwise when `cautious` (both required then, param's shape), else 1."""
    check_contiguous("param", param)
    check_contiguous("o", o)
    if cautious:
        _need_grad_momentum(grad, momentum)
        g, m = grad.reshape(param.shape), momentum.reshape(param.shape)
        check_contiguous("grad", g)
        check_contiguous("momentum", m)
    else:  # never read by the kernel: any small 2-D array of a supported dtype
        g = m = zeros1(param.device).view(1, 1)
    kernel = _apply_kernel(param.dtype, o.dtype, g.dtype, m.dtype, bool(cautious))
    launch(kernel, grid_for(param.shape[0], 1), threads(), param, o, v, scale, hp, g, m)
