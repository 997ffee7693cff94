"""Optimizer-step ops of a multi-rank plan: each rank updates its slice (ZeRO-1/2/3).

The plan gives every step op this rank's shard of the optimizer states and master weight; the weight
and the gradient may be full (replicated) or this rank's shard:

    ZeRO-1  w full (attrs["slice"]), grad full (all-reduced)   -> slice both, update, all_gather re-replicates w
    ZeRO-2  w full (attrs["slice"]), grad shard (reduce-scattered)  -> slice w
    ZeRO-3  w shard, grad shard (or full with shard_weights alone)   -> slice grad when it is full

AdamW is element-wise, so a slice's update is exactly that slice of the full update (the 8-bit moments
are quantized per block of 256 elements of the shard: when a shard's element count is a multiple of 256
the blocks are the single-rank run's blocks, else quantization differs slightly, as in any ZeRO-sharded
8-bit optimizer). NorMuon orthogonalises whole matrices: row shards are gathered to full matrices, every
rank computes the full update (redundantly) and keeps its rows, so it is exact for any shard size.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from surogate.runtime.distributed import comm
from surogate.runtime.distributed.shards import rank_slice

Kernel = Callable[[list, dict, Any], list]


def _is_full(x: torch.Tensor, shard_rows: int) -> bool:
    return x.dim() > 0 and x.shape[0] != shard_rows


def sliced_adamw(kernel: Kernel) -> Kernel:
    """Wrap the element-wise AdamW step op so that it updates this rank's rows of a full weight/gradient."""

    def step(ins: list, attrs: dict, ctx: Any) -> list:
        if comm.world() == 1:
            return kernel(ins, attrs, ctx)
        k = 2 if ins[2].dtype != torch.uint8 else 1  # index of the gradient: a master copy comes first
        rows = ins[k + 1].shape[0] if ins[k + 1].dim() else 0  # m codes: this rank's shard shape
        w, r = ins[0], comm.rank()
        args = list(ins)
        if _is_full(ins[k], rows):
            args[k] = rank_slice(ins[k], rows, r)
        if not _is_full(w, rows):
            return kernel(args, attrs, ctx)
        part = rank_slice(w, rows, r)
        args[0] = part
        outs = kernel(args, attrs, ctx)
        lo = min(r * rows, w.shape[0])
        hi = min(lo + rows, w.shape[0])
        if part.data_ptr() != w[lo:hi].data_ptr() or hi - lo != rows:  # padded copy: write the real rows back
            w[lo:hi] = part[: hi - lo]
        return [w, *outs[1:]]

    return step


def gathered_normuon(kernel: Kernel) -> Kernel:
    """Wrap the NorMuon step op: gather row shards to full matrices, update in full, keep this rank's rows."""

    def step(ins: list, attrs: dict, ctx: Any) -> list:
        if comm.world() == 1:
            return kernel(ins, attrs, ctx)
        w = ins[0]
        clip = ins[-1] if ins[-1].dim() == 0 else None
        body = ins[:-1] if clip is not None else list(ins)
        # [w, master?, grad, momentum, row_variance]
        master = len(body) == 5
        k = 2 if master else 1
        momentum, row_var = body[k + 1], body[k + 2]
        shard_rows = momentum.shape[0]
        # the full weight or gradient tells the row count; with both sharded (ZeRO-3) the gathered matrices
        # keep the zero padding rows, which Newton-Schulz and the row normalisation leave at zero
        full = [x.shape[0] for x in (w, body[k]) if x.shape[0] != shard_rows]
        full_rows = full[0] if full else shard_rows * comm.world()
        r = comm.rank()
        gathered = [w if w.shape[0] == full_rows else comm.all_gather_rows(w, full_rows)]
        if master:
            gathered.append(comm.all_gather_rows(body[1], full_rows))
        g = body[k]
        gathered.append(g if g.shape[0] == full_rows else comm.all_gather_rows(g, full_rows))
        gathered.append(comm.all_gather_rows(momentum, full_rows))
        per_row = row_var.numel() // shard_rows  # row variances: one per output row of each matrix
        rv_full = comm.all_gather_rows(row_var.view(shard_rows, per_row), full_rows).reshape(-1)
        gathered.append(rv_full)
        args = [t.clone() for t in gathered] + ([clip] if clip is not None else [])
        outs = kernel(args, attrs, ctx)
        new = dict(zip(("w", *(("master",) if master else ()), "momentum", "row_var"), outs, strict=True))
        if w.shape[0] == full_rows:
            w.copy_(new["w"])
        else:
            w.copy_(rank_slice(new["w"], shard_rows, r))
        if master:
            body[1].copy_(rank_slice(new["master"], shard_rows, r))
        momentum.copy_(rank_slice(new["momentum"], shard_rows, r))
        row_var.copy_(rank_slice(new["row_var"].view(full_rows, per_row), shard_rows, r).reshape(row_var.shape))
        return [w, *([body[1]] if master else []), momentum, row_var]

    return step


def wrap_step_kernels(table: dict[str, Kernel]) -> dict[str, Kernel]:
    """Make a fresh kernel table's optimizer-step ops rank-aware in place (the cpu table's already are)."""
    if "adamw8bit_step" in table:
        table["adamw8bit_step"] = sliced_adamw(table["adamw8bit_step"])
    if "normuon_step" in table:
        table["normuon_step"] = gathered_normuon(table["normuon_step"])
    return table
