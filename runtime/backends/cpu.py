"""The `cpu` backend: the reference kernels (torch) plus optimizer, copy and collective ops.

Runs every op of a plan on a machine without a GPU. Collectives go through `torch.distributed`
(gloo) when the plan has more than one rank.
"""

from __future__ import annotations

from typing import Any

import torch

from surogate.runtime import optim
from surogate.runtime.distributed.optim_slices import gathered_normuon, sliced_adamw
from surogate.runtime.distributed.shards import rank_slice, shard_rows
from surogate.runtime.reference import KERNELS as REFERENCE

BYTE_GATHERED = frozenset({torch.float8_e4m3fn, torch.float8_e5m2})


def copy(ins: list, attrs: dict, ctx: Any) -> list:
    """Host <-> device copies: on the CPU both spaces are host memory, the copy is still made."""
    return [ins[0]]


def _world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _all_to_all_sum(padded: torch.Tensor, world: int) -> torch.Tensor:
    """Reduce-scatter of `padded` (world equal row blocks) by one all-to-all: every rank receives its block from
    each peer and adds them up locally, in rank order (`use_all_to_all_reduce`)."""
    import torch.distributed as dist

    received = torch.empty_like(padded)
    dist.all_to_all_single(received, padded)
    return received.view(world, padded.shape[0] // world, *padded.shape[1:]).sum(0)


def _all_to_all_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """A sum all-reduce as an all-to-all reduce-scatter followed by an all-gather (`use_all_to_all_reduce`)."""
    import torch.distributed as dist

    world = dist.get_world_size()
    flat = x.reshape(-1)
    per_rank = -(-flat.numel() // world)
    padded = torch.zeros(per_rank * world, dtype=x.dtype, device=x.device)
    padded[: flat.numel()] = flat
    mine = _all_to_all_sum(padded, world)
    parts = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine)
    return torch.cat(parts)[: flat.numel()].view_as(x)


def all_reduce(ins: list, attrs: dict, ctx: Any) -> list:
    import torch.distributed as dist

    if attrs.get("when") == "last_micro_step" and not getattr(ctx, "last_micro_step", True):
        return [None]  # gradients still accumulating: reduce once, after the step's last micro-batch
    x = ins[0].clone()
    if _world() > 1:
        if attrs.get("op") == "sum_of_squares":  # a norm: combine as sqrt(sum of squares)
            sq = x.float().pow(2)
            dist.all_reduce(sq)
            return [sq.sqrt().to(x.dtype)]
        if attrs.get("all_to_all"):  # use_all_to_all_reduce: reduce-scatter by all-to-all, then all-gather
            x = _all_to_all_all_reduce(x)
        else:
            dist.all_reduce(x)
        if attrs.get("op", "avg") == "avg":
            x /= _world()
    return [x]


def all_gather(ins: list, attrs: dict, ctx: Any) -> list:
    import torch.distributed as dist

    world = _world()
    if world == 1:
        return [ins[0]]
    full_rows = ctx.shape_of_output(0)[0]
    if attrs.get("in_place"):  # a replicated weight whose rank slice the optimizer just updated
        shard = rank_slice(ins[0], shard_rows(full_rows, world), dist.get_rank()).contiguous()
    else:
        shard = ins[0].contiguous()
    dtype = shard.dtype
    if dtype in BYTE_GATHERED:  # a gather only moves bytes: fp8 shards travel as uint8 (gloo has no fp8 type)
        shard = shard.view(torch.uint8)
    parts = [torch.empty_like(shard) for _ in range(world)]
    dist.all_gather(parts, shard)
    return [torch.cat(parts, 0)[:full_rows].view(dtype)]


def reduce_scatter(ins: list, attrs: dict, ctx: Any) -> list:
    import torch.distributed as dist

    full = ins[0].contiguous()
    world = _world()
    if world == 1:
        return [full]
    rows = ctx.shape_of_output(0)[0]
    padded = torch.zeros((rows * world, *full.shape[1:]), dtype=full.dtype)
    padded[: full.shape[0]] = full
    if attrs.get("all_to_all"):  # use_all_to_all_reduce
        out = _all_to_all_sum(padded, world)
    elif dist.get_backend() == "gloo":  # gloo has no reduce_scatter: all-reduce, keep this rank's rows
        dist.all_reduce(padded)
        out = padded[dist.get_rank() * rows : (dist.get_rank() + 1) * rows]
    else:
        out = torch.empty((rows, *full.shape[1:]), dtype=full.dtype)
        dist.reduce_scatter_tensor(out, padded)
    return [out / world]


KERNELS: dict[str, Any] = {
    **REFERENCE,
    **optim.KERNELS,
    # multi-rank plans: each rank steps its slice (identity wrappers with one rank)
    "adamw8bit_step": sliced_adamw(optim.adamw8bit_step),
    "normuon_step": gathered_normuon(optim.normuon_step),
    "copy_h2d": copy,
    "copy_d2h": copy,
    "all_reduce": all_reduce,
    "all_gather": all_gather,
    "reduce_scatter": reduce_scatter,
}
