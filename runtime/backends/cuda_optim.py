"""Optimizer-step kernels of the `cuda` backend (8-bit AdamW, NorMuon, gradient norm and clipping) and the
copy / collective kinds.

The update kernels are the Numba-CUDA launchers of `numba_kernels`; their hyperparameters (learning rate
times the schedule, bias corrections, the clip factor) are fp32 device tensors refreshed per step outside
any capture, so the optimizer program can be replayed from a CUDA graph. The clip factor is copied on the
device from the plan's `grad_clip_scale` output.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from surogate.numba_kernels import KERNELS as NK
from surogate.numba_kernels import normuon as nm
from surogate.runtime.backends import cpu as cpu_backend
from surogate.runtime.backends import cuda_sizes as sz
from surogate.runtime.backends.cuda_state import CudaState
from surogate.runtime.optim import _matrices, _unpack


def _adam_values(attrs: dict):
    lr, b1, b2 = float(attrs["lr"]), float(attrs["beta1"]), float(attrs["beta2"])
    eps, wd = float(attrs["epsilon"]), float(attrs["weight_decay"])

    def values(ctx: Any) -> list[float]:
        step = int(ctx.optimizer_step)
        return [lr * float(ctx.lr_scale), b1, b2, eps, wd, 1 - b1**step, math.sqrt(1 - b2**step), 1.0]

    return values


def adamw8bit_step(st: CudaState, ins: list, attrs: dict, ctx: Any) -> list:
    w, master, grad, (m, v, m_abs, v_abs), clip = _unpack(ins, ins[2].dtype != torch.uint8, 4)
    # one hyperparameter buffer per distinct setting (not per parameter): one refresh and one clip copy for all
    key = sz.adamw_scalar_key(attrs, clip is not None)
    hp = st.scalars(key, sz.ADAMW_SCALARS, w.device, _adam_values(attrs), ctx)
    if clip is not None and st.first_in_run(("clip", key), ctx):  # grad_scale from the device, captured with the step
        hp[7:8].copy_(clip.reshape(1))
    state = {"m_codes": m.view(-1), "v_codes": v.view(-1), "m_absmax": m_abs, "v_absmax": v_abs}
    NK["adamw8bit_step"].cuda(w, grad, state, hp, master=master)
    return [w, *([master] if master is not None else []), m, v, m_abs, v_abs]


def normuon_step(st: CudaState, ins: list, attrs: dict, ctx: Any) -> list:
    """Momentum (Numba), Newton-Schulz (torch GEMMs), row normalisation and the update (Numba)."""
    w, master, grad, (momentum, row_var), clip = _unpack(ins, ins[3].shape == ins[0].shape, 2)
    target = master if master is not None else w
    dev = w.device
    lr, wd = float(attrs["lr"]), float(attrs["weight_decay"])
    hp = st.scalars(("normuon", id(attrs)), sz.NORMUON_SCALARS, dev, lambda ctx: [lr * float(ctx.lr_scale), wd], ctx)
    g = grad
    rows, cols = target.shape[-2], target.shape[-1]
    specs = sz.normuon(rows, cols, tuple(grad.shape) if clip is not None else None)
    if clip is not None:
        g = st.alloc(specs.pop(0), dev)
        torch.mul(grad, clip, out=g)
    update, rowsq, scale = (st.alloc(s, dev) for s in specs)
    for i, (t, gi, mi) in enumerate(zip(_matrices(target), _matrices(g), _matrices(momentum), strict=True)):
        gi = gi.contiguous()
        NK["normuon_momentum"].cuda(gi, mi, update, float(attrs["momentum"]))
        o = nm.newton_schulz5_ref(update).contiguous()
        rv = row_var.view(-1)[i * rows : (i + 1) * rows]
        NK["normuon_normalise"].cuda(o, rv, rowsq, scale, float(attrs["beta2"]))
        NK["normuon_apply"].cuda(t, o, rv, scale, hp, bool(attrs["cautious_wd"]), grad=gi, momentum=mi)
    if master is not None:
        w.copy_(master)
    return [w, *([master] if master is not None else []), momentum, row_var]


def grad_norm(st: CudaState, ins: list, attrs: dict, ctx: Any) -> list:
    out = st.bind(ins, attrs, ctx).views[0]
    acc, part = (st.alloc(s, out.device) for s in sz.GRAD_NORM)
    acc.zero_()
    for g in ins:
        torch.linalg.vector_norm(g, dtype=torch.float32, out=part)
        acc.addcmul_(part, part)
    torch.sqrt(acc, out=out.reshape(()))
    return [out]


def grad_clip_scale(st: CudaState, ins: list, attrs: dict, ctx: Any) -> list:
    out = st.bind(ins, attrs, ctx).views[0]
    limit = float(attrs["max_grad_norm"])
    # min(1, limit / (norm + 1e-6)) on the device
    torch.add(ins[0].reshape(out.shape).float(), 1e-6, out=out)
    out.reciprocal_().mul_(limit).clamp_(max=1.0)
    return [out]


def copy(st: CudaState, ins: list, attrs: dict, ctx: Any) -> list:
    """Host <-> device copies: the executor copies into the planned view (non-blocking from pinned memory)."""
    return [ins[0]]


def all_reduce(st: CudaState, ins: list, attrs: dict, ctx: Any) -> list:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return [ins[0]]
    return cpu_backend.all_reduce(ins, attrs, ctx)


def all_gather(st: CudaState, ins: list, attrs: dict, ctx: Any) -> list:
    return cpu_backend.all_gather(ins, attrs, ctx)


def reduce_scatter(st: CudaState, ins: list, attrs: dict, ctx: Any) -> list:
    with torch.device(ins[0].device):  # the cpu kernel builds its buffers with the default device
        return cpu_backend.reduce_scatter(ins, attrs, ctx)


KERNELS = {
    "adamw8bit_step": adamw8bit_step,
    "normuon_step": normuon_step,
    "grad_norm": grad_norm,
    "grad_clip_scale": grad_clip_scale,
    "copy_h2d": copy,
    "copy_d2h": copy,
    "all_reduce": all_reduce,
    "all_gather": all_gather,
    "reduce_scatter": reduce_scatter,
}
