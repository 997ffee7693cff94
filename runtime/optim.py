"""Optimizer-step ops of the plan on the CPU backend: 8-bit AdamW, NorMuon, gradient norm and clipping.

The math lives in `numba_kernels` (each kernel's reference implementation); this module adapts the
plan's op layout to it. Step ops update weights, master copies and states in place in their arena
views. The learning rate of a step is `attrs["lr"] * ctx.lr_scale` (schedule and automatic
reductions), bias correction uses `ctx.optimizer_step` (1-based count of applied steps).

Input layouts (from the optimizer pass):
    adamw8bit_step: [w, master?, grad, m, v, m_absmax, v_absmax, clip_scale?]
    normuon_step:   [w, master?, grad, momentum, row_variance, clip_scale?]
"""

from __future__ import annotations

from typing import Any

import torch

from surogate.numba_kernels import adamw8bit, normuon
from surogate.numba_kernels.quant8 import dynamic_map


def _unpack(ins: list[torch.Tensor], has_master: bool, n_states: int) -> tuple:
    """(w, master or None, grad, states, clip or None) from an optimizer op's inputs."""
    k = 2 if has_master else 1
    clip = ins[k + 1 + n_states] if len(ins) > k + 1 + n_states else None
    return ins[0], ins[1] if has_master else None, ins[k], ins[k + 1 : k + 1 + n_states], clip


def adamw8bit_step(ins: list, attrs: dict, ctx: Any) -> list:
    # The uint8 moment codes start at index 2, or at 3 when a master copy comes first.
    w, master, grad, (m, v, m_abs, v_abs), clip = _unpack(ins, ins[2].dtype != torch.uint8, 4)
    hp = adamw8bit.adamw_hparams(
        attrs["lr"] * ctx.lr_scale, attrs["beta1"], attrs["beta2"], attrs["epsilon"], attrs["weight_decay"],
        ctx.optimizer_step, grad_scale=float(clip) if clip is not None else 1.0,
    )
    state = {"m_codes": m.view(-1), "v_codes": v.view(-1), "m_absmax": m_abs, "v_absmax": v_abs}
    adamw8bit.adamw8bit_step_ref(w, grad, state, hp, master=master)
    return [w, *([master] if master is not None else []), m, v, m_abs, v_abs]


def normuon_step(ins: list, attrs: dict, ctx: Any) -> list:
    # [w, master?, grad, momentum, row_variance, clip?]: with a master, index 3 (momentum) has w's shape.
    w, master, grad, (momentum, row_var), clip = _unpack(ins, ins[3].shape == ins[0].shape, 2)
    target = master if master is not None else w
    g = grad.float() * (float(clip) if clip is not None else 1.0)
    rows = target.shape[-2]
    # Stacked matrices (MoE experts, [E, rows, cols]) are orthogonalised one matrix at a time.
    for i, (t, gi, mi) in enumerate(zip(_matrices(target), _matrices(g), _matrices(momentum), strict=True)):
        new_m, update = normuon.normuon_momentum_ref(gi, mi, attrs["momentum"])
        mi.copy_(new_m)
        o = normuon.newton_schulz5_ref(update).float()
        rv = row_var.view(-1)[i * rows : (i + 1) * rows]
        d, new_v = normuon.normuon_normalise_ref(o, rv, attrs["beta2"])
        rv.copy_(new_v)
        # cautious decay: mask from this step's gradient and the updated (stored) momentum
        t.copy_(normuon.normuon_apply_ref(t, d, attrs["lr"] * ctx.lr_scale, attrs["weight_decay"], attrs["cautious_wd"],
                                          grad=gi, momentum=mi))
    if master is not None:
        w.copy_(master.to(w.dtype))
    return [w, *([master] if master is not None else []), momentum, row_var]


def _matrices(t: torch.Tensor) -> list[torch.Tensor]:
    """The 2-D matrices of a 2-D or stacked (N-D) tensor, as views."""
    return [t] if t.dim() == 2 else list(t.reshape(-1, *t.shape[-2:]).unbind(0))


def grad_norm(ins: list, attrs: dict, ctx: Any) -> list:
    total = torch.zeros((), dtype=torch.float64)
    for g in ins:
        total += g.double().pow(2).sum()
    return [total.sqrt().float()]


def grad_clip_scale(ins: list, attrs: dict, ctx: Any) -> list:
    norm = float(ins[0])
    limit = attrs["max_grad_norm"]
    return [torch.tensor(min(1.0, limit / (norm + 1e-6)), dtype=torch.float32)]


def init_optimizer_state(name: str, view: torch.Tensor, state_kind: str) -> None:
    """Initial value of a state tensor: moments that dequantize to exactly 0."""
    if state_kind == "m":
        view.fill_(int(torch.nonzero(dynamic_map(True) == 0)[0, 0]))
    else:
        view.zero_()


KERNELS = {
    "adamw8bit_step": adamw8bit_step,
    "normuon_step": normuon_step,
    "grad_norm": grad_norm,
    "grad_clip_scale": grad_clip_scale,
}
