"""8-bit AdamW step: blockwise dynamic-quantized moments, decoupled weight decay, bias correction.

State: first moment m as uint8 codes of the signed dynamic map, second moment v with the unsigned map,
each with one fp32 absmax per block of QBLOCK = 256 consecutive elements (bitsandbytes' blockwise 8-bit
optimizer block size; one GPU thread per element of a block).
Math per step (the definition; torch.optim.AdamW with 8-bit moment storage):
    g = grad * grad_scale                          (fp32; grad may be bf16)
    m = beta1 * dq(m) + (1 - beta1) * g,   v = beta2 * dq(v) + (1 - beta2) * g * g
    p = p * (1 - lr * weight_decay)
    p = p - (lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps)        bc_i = 1 - beta_i ** step
    m, v are re-quantized blockwise (new absmax per block) after the update, which uses the fp32 values.
The parameter is fp32 or bf16; with an fp32 `master` copy the update runs on the master and the param
receives its bf16 rounding. Hyperparameters travel in an fp32 device tensor (`adamw_hparams`), so the
launch can be captured in a CUDA graph and the learning rate changed between replays.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from ._device import (
    check_contiguous,
    converters,
    device_constant,
    get_cuda,
    grid_for,
    helpers,
    jit_kernel,
    launch,
    threads,
    zeros1,
)
from .quant8 import dynamic_map, nearest_code_device, nearest_code_ref, normalise_ref

cuda = None  # numba.cuda, bound by the first kernel build (lazy import)

QBLOCK = 256
HP_FIELDS = ("lr", "beta1", "beta2", "eps", "weight_decay", "bias_correction1", "bias_correction2_sqrt", "grad_scale")


def adamw_hparams(
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
    grad_scale: float = 1.0,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """fp32 [8] device scalars in HP_FIELDS order for `step` (1-based); filled in place when `out` is given."""
    vals = torch.tensor(
        [lr, beta1, beta2, eps, weight_decay, 1 - beta1**step, math.sqrt(1 - beta2**step), grad_scale],
        dtype=torch.float32,
    )
    if out is None:
        return vals
    out.copy_(vals)
    return out


def adamw8bit_state(numel: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Zero state for `numel` parameters: codes of exact 0 and absmax 0 (so every moment dequantizes to 0)."""
    nb = math.ceil(numel / QBLOCK)
    zero_m = int(torch.nonzero(dynamic_map(True) == 0)[0, 0])
    return {
        "m_codes": torch.full((numel,), zero_m, dtype=torch.uint8, device=device),
        "m_absmax": torch.zeros(nb, dtype=torch.float32, device=device),
        "v_codes": torch.zeros(numel, dtype=torch.uint8, device=device),
        "v_absmax": torch.zeros(nb, dtype=torch.float32, device=device),
    }


# ---------------------------------------------------------------- reference


def adamw8bit_step_ref(
    param: torch.Tensor,
    grad: torch.Tensor,
    state: dict[str, torch.Tensor],
    hp: torch.Tensor,
    master: torch.Tensor | None = None,
) -> None:
    """One step in place on param (and master) and state, with exactly the kernel's fp32 operations."""
    lr, b1, b2, eps, wd, bc1, bc2s, gs = (hp[i] for i in range(8))
    n = param.numel()
    nb = math.ceil(n / QBLOCK)
    qm, qv = dynamic_map(True), dynamic_map(False)

    def blocks(t):
        out = torch.zeros(nb * QBLOCK, dtype=torch.float32)
        out[:n] = t.float().reshape(-1)
        return out.view(nb, QBLOCK)

    g = blocks(grad) * gs
    m_old = qm[blocks(state["m_codes"]).long()] * state["m_absmax"][:, None]
    v_old = qv[blocks(state["v_codes"]).long()] * state["v_absmax"][:, None]
    m = b1 * m_old + (1 - b1) * g
    v = b2 * v_old + (1 - b2) * (g * g)
    tail = torch.arange(nb * QBLOCK).view(nb, QBLOCK) >= n
    m[tail], v[tail] = 0.0, 0.0  # padding never enters a block's absmax
    p = blocks(master if master is not None else param)
    p = p * (1 - lr * wd)
    # IEEE sqrt (via fp64, correctly rounded) and divisors as full tensors / NumPy fp32: torch's CPU fp32
    # sqrt is not correctly rounded, and it divides by a one-element CPU tensor as a reciprocal multiply;
    # the kernel does IEEE sqrt and division
    denom = torch.sqrt(v.double()).float() / bc2s.expand_as(v) + eps
    step_size = torch.tensor(np.float32(lr.item()) / np.float32(bc1.item()), dtype=torch.float32)
    p = p - step_size * (m / denom)
    m_abs, v_abs = m.abs().amax(1), v.amax(1)
    state["m_codes"].copy_(nearest_code_ref(normalise_ref(m, m_abs), qm).reshape(-1)[:n])
    state["v_codes"].copy_(nearest_code_ref(normalise_ref(v, v_abs), qv).reshape(-1)[:n])
    state["m_absmax"].copy_(m_abs)
    state["v_absmax"].copy_(v_abs)
    flat = p.reshape(-1)[:n].reshape(param.shape)
    if master is not None:
        master.copy_(flat)
    param.copy_(flat.to(param.dtype))


# ---------------------------------------------------------------- kernel


@functools.cache
def _kernel(p_dt: torch.dtype, g_dt: torch.dtype, has_master: bool):
    global cuda  # a module global: the simulator swaps `cuda` in kernels' globals at launch
    cuda = get_cuda()
    from numba import float32, uint8

    lp, sp = converters(p_dt)
    lg, _ = converters(g_dt)
    block_max = helpers().block_max
    nearest_code = nearest_code_device()
    T = threads()

    @jit_kernel
    def kernel(param, master, grad, m_codes, m_absmax, v_codes, v_absmax, qm_g, qv_g, hp):
        red = cuda.shared.array(T, float32)
        qm = cuda.shared.array(256, float32)
        qv = cuda.shared.array(256, float32)
        m_new = cuda.shared.array(QBLOCK, float32)
        v_new = cuda.shared.array(QBLOCK, float32)
        tid = cuda.threadIdx.x
        for k in range(tid, 256, T):
            qm[k] = qm_g[k]
            qv[k] = qv_g[k]
        cuda.syncthreads()
        lr, b1, b2, eps = hp[0], hp[1], hp[2], hp[3]
        wd, bc1, bc2s, gs = hp[4], hp[5], hp[6], hp[7]
        one = float32(1.0)
        n = param.shape[0]
        for b in range(cuda.blockIdx.x, m_absmax.shape[0], cuda.gridDim.x):
            start = b * QBLOCK
            am_o = m_absmax[b]
            av_o = v_absmax[b]
            mmax = float32(0.0)
            vmax = float32(0.0)
            for k in range(tid, QBLOCK, T):
                i = start + k
                if i < n:
                    g = lg(grad[i]) * gs
                    m = b1 * (qm[m_codes[i]] * am_o) + (one - b1) * g
                    v = b2 * (qv[v_codes[i]] * av_o) + (one - b2) * (g * g)
                    if has_master:
                        p = master[i]
                    else:
                        p = lp(param[i])
                    p = p * (one - lr * wd)
                    denom = float32(math.sqrt(v)) / bc2s + eps
                    p = p - (lr / bc1) * (m / denom)
                    if has_master:
                        master[i] = p
                    param[i] = sp(p)
                    m_new[k] = m
                    v_new[k] = v
                    mmax = max(mmax, abs(m))
                    vmax = max(vmax, v)
            am = block_max(red, mmax)
            av = block_max(red, vmax)
            for k in range(tid, QBLOCK, T):
                i = start + k
                if i < n:
                    x = float32(0.0)
                    if am > float32(0.0):
                        x = m_new[k] / am
                    m_codes[i] = uint8(nearest_code(qm, x))
                    y = float32(0.0)
                    if av > float32(0.0):
                        y = v_new[k] / av
                    v_codes[i] = uint8(nearest_code(qv, y))
            if tid == 0:
                m_absmax[b] = am
                v_absmax[b] = av
            cuda.syncthreads()  # m_new / v_new are reused by this thread block's next quantization block

    return kernel


def _maps(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return (device_constant("qmap-signed", device, lambda: dynamic_map(True)),
            device_constant("qmap-unsigned", device, lambda: dynamic_map(False)))


def adamw8bit_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    state: dict[str, torch.Tensor],
    hp: torch.Tensor,
    master: torch.Tensor | None = None,
) -> None:
    """One AdamW step in place: param (fp32/bf16), optional fp32 master, 8-bit state from `adamw8bit_state`.

    grad is fp32 or bf16 with param's numel; hp is `adamw_hparams(...)` on the same device.
    """
    for name, t in (("param", param), ("grad", grad), ("master", master)):
        if t is not None:
            check_contiguous(name, t)
    n = param.numel()
    if grad.numel() != n or state["m_codes"].numel() != n or (master is not None and master.numel() != n):
        raise ValueError(f"param, grad, master and state must all have {n} elements")
    if master is not None and master.dtype != torch.float32:
        raise TypeError(f"master weights must be float32, got {master.dtype}")
    qm, qv = _maps(param.device)
    has_master = master is not None
    kernel = _kernel(param.dtype, grad.dtype, has_master)
    nb = state["m_absmax"].numel()
    launch(
        kernel,
        grid_for(nb, 1),
        threads(),
        param.view(-1),
        master.view(-1) if has_master else zeros1(param.device),
        grad.view(-1),
        state["m_codes"],
        state["m_absmax"],
        state["v_codes"],
        state["v_absmax"],
        qm,
        qv,
        hp,
    )
