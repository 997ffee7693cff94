"""Quantization kernels of the CPU reference backend: QLoRA dequant, matmul-input quantize, qlinear (and the
Quartet kinds of `kernels_quartet`)."""

from __future__ import annotations

from typing import Any

import torch

from surogate.runtime.distributed import comm
from surogate.runtime.distributed.shards import rank_slice
from surogate.runtime.reference.kernels_quartet import KERNELS as QUARTET
from surogate.runtime.reference.kernels_quartet import quartet_quantize
from surogate.runtime.reference.quant import FP8_MAX, dequantize, quantize

Tensors = list[torch.Tensor | None]


def dequant(x: Tensors, a: dict, ctx: Any) -> Tensors:
    return [dequantize(a["format"], list(x), tuple(a["shape"]), a["block_size"], a.get("double_quant", False))]


def quantize_kernel(x: Tensors, a: dict, ctx: Any) -> Tensors:
    """fp8: delayed scaling from max(amax history, current amax); the history is advanced in place.

    `keep_rank_rows` (a cached weight quantization under ZeRO-3 / `shard_weights`): the input is the gathered
    full weight, the outputs are this rank's persistent shards, so each full result keeps the rank's rows."""
    outs = _quantize(x, a, ctx)
    if a.get("keep_rank_rows"):
        outs = [_rank_rows(v, shape) for v, shape in zip(outs, ctx.out_shapes, strict=True)]
    return outs


def _rank_rows(full: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """This rank's rows of `full` (zero-padded) when the planned output `shape` is a shard of it; else `full` (a
    one-row scale is whole on every rank: its shard is itself)."""
    if full.dim() == 0 or tuple(full.shape) == tuple(shape):
        return full
    return rank_slice(full, shape[0], comm.rank())


def _quantize(x: Tensors, a: dict, ctx: Any) -> Tensors:
    src = x[0]
    if a["format"] == "fp4_quartet":
        return quartet_quantize(x, a, ctx)
    if a["format"] != "fp8_tensor":
        return quantize(a["format"], src, 16)
    window, update = amax_window(x[1], a, ctx)
    amax = src.abs().amax().float()
    scale = torch.maximum(window.max(), amax).clamp(min=1e-12) / FP8_MAX
    if update:
        x[1].copy_(torch.cat([amax[None], x[1][:-1]]))
    return [(src.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale.reshape(1)]


def amax_window_slots(length: int, a: dict, ctx: Any) -> tuple[tuple[int, int], bool]:
    """((lo, hi): the slots of a `length`-value amax history this quantize scales by, whether it pushes its amax).
    The history holds one value more than the window (newest first). A forward reads the newest values and pushes;
    a recompute or a backward redo (`update_history: False`) reads one slot further, the window its forward read, so
    it gets the forward's scale even when the value the push dropped was the largest; evaluation reads and never
    pushes."""
    if not a.get("update_history", True):
        return (1, length), False
    return (0, length - 1), bool(getattr(ctx, "training", True))


def amax_window(hist: torch.Tensor, a: dict, ctx: Any) -> tuple[torch.Tensor, bool]:
    """(the history values this quantize scales by, whether it pushes its amax): see `amax_window_slots`."""
    (lo, hi), push = amax_window_slots(hist.numel(), a, ctx)
    return hist[lo:hi], push


def _deq(q: torch.Tensor, s: torch.Tensor, fmt: str, shape: torch.Size) -> torch.Tensor:
    return dequantize(fmt, [q, s], tuple(shape), 16)


def qlinear(x: Tensors, a: dict, ctx: Any) -> Tensors:
    """x @ W^T from the quantized copies. W itself (x[1]) is not read (`shape_only_inputs`: under ZeRO-3 it is the
    rank's shard); w_q has W's shape (4-bit codes reach kernels unpacked)."""
    inp, _, xq, xs, wq, ws = x[:6]
    y = _deq(xq, xs, a["format"], inp.shape) @ _deq(wq, ws, a["format"], wq.shape).t()
    if len(x) > 6 and x[6] is not None:
        y = y + x[6].float()
    return [y]


E5M2_MAX = 57344.0
GRAD_FORMATS = {"fp8_e5m2": (torch.float8_e5m2, E5M2_MAX), "fp8_e4m3": (torch.float8_e4m3fn, 448.0)}


def _grad_quant(dy: torch.Tensor, a: dict) -> torch.Tensor:
    """Round the output gradient through its fp8 format (fp8_hybrid: e5m2, or gradient_dtype's) with a just-in-time
    per-tensor scale."""
    if a.get("grad_format") not in GRAD_FORMATS:
        return dy.float()
    dtype, top = GRAD_FORMATS[a["grad_format"]]
    scale = dy.abs().amax().float().clamp(min=1e-30) / top
    return (dy.float() / scale).to(dtype).float() * scale


def qlinear_bwd_data(x: Tensors, a: dict, ctx: Any) -> Tensors:
    dy, wq, ws = x
    dy = _grad_quant(dy, a)
    out_f = dy.shape[-1]
    w = _deq(wq, ws, a["format"], torch.Size((out_f, wq.numel() // out_f)))
    return [dy.float() @ w]


def qlinear_bwd_weight(x: Tensors, a: dict, ctx: Any) -> Tensors:
    dy, xq, xs = x
    dy = _grad_quant(dy, a)
    xr = _deq(xq, xs, a["format"], xq.shape).reshape(-1, xq.shape[-1])
    dyr = dy.reshape(-1, dy.shape[-1]).float()
    outs: Tensors = [dyr.t() @ xr]
    if a.get("has_bias"):
        outs.append(dyr.sum(0))
    return outs


KERNELS = {"dequant": dequant, "quantize": quantize_kernel, "qlinear": qlinear,
           "qlinear_bwd_data": qlinear_bwd_data, "qlinear_bwd_weight": qlinear_bwd_weight, **QUARTET}
