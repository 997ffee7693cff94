"""Reference kernels of the stacked GEMMs (pass `group_lora_projections`): one GEMM over weights stacked by rows.

`linear_stacked(x, W_1..W_n)`: x @ [W_1; ...; W_n]^T, the n products side by side in one output.
`linear_stacked_bwd_data(dy, W_1..W_n)`: dy @ [W_1; ...; W_n] (dy holds the n output gradients side by side).
`linear_stacked_bwd_weight(dy, x)`: dy^T @ x split by rows into the n weight gradients.
Each is the unstacked kind's math on the concatenated weights (the cuda backend reads the planned adjacent
weights as that matrix in place)."""

from __future__ import annotations

from typing import Any

import torch

from surogate.runtime.reference.kernels_bwd import linear_bwd_data, linear_bwd_weight
from surogate.runtime.reference.kernels_fwd import linear

Tensors = list[torch.Tensor]


def linear_stacked(x: Tensors, a: dict, ctx: Any) -> Tensors:
    return linear([x[0], torch.cat(list(x[1:]), dim=0)], a, ctx)


def linear_stacked_bwd_data(x: Tensors, a: dict, ctx: Any) -> Tensors:
    return linear_bwd_data([x[0], torch.cat(list(x[1:]), dim=0)], a, ctx)


def linear_stacked_bwd_weight(x: Tensors, a: dict, ctx: Any) -> Tensors:
    (dw,) = linear_bwd_weight(x, {k: v for k, v in a.items() if k != "has_bias"}, ctx)
    rows = [s[0] for s in ctx.out_shapes]
    return list(torch.split(dw, rows, dim=0))


KERNELS = {"linear_stacked": linear_stacked, "linear_stacked_bwd_data": linear_stacked_bwd_data,
           "linear_stacked_bwd_weight": linear_stacked_bwd_weight}
