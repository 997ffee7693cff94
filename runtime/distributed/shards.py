"""A rank's slice of a full tensor (the ZeRO layout), and full tensors back from every rank's shard.

ZeRO shards split dimension 0 into `ceil(rows / world)` rows per rank (`compiler.passes.zero.shard_shape`);
rank r owns rows [r*S, min((r+1)*S, rows)), and the last ranks' shards are zero-padded to S rows (zero
weights, gradients and optimizer moments stay zero under every update, so padding never leaks).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from surogate.compiler.ir import Role, Tensor
from surogate.compiler.passes.precision import is_amax_history
from surogate.compiler.passes.zero import shard_shape
from surogate.compiler.plan import Plan
from surogate.runtime.distributed import comm
from surogate.runtime.optim import init_optimizer_state


def shard_rows(full_rows: int, world: int) -> int:
    """Rows of one rank's shard: the compiler's split (`shard_shape`), so runtime and plan always agree."""
    return shard_shape((full_rows,), world)[0]


def row_range(full_rows: int, world: int, rank: int) -> tuple[int, int]:
    """[lo, hi) rows of the full tensor that `rank` owns (empty when the shards run out)."""
    s = shard_rows(full_rows, world)
    lo = min(rank * s, full_rows)
    return lo, min(lo + s, full_rows)


def rank_slice(full: torch.Tensor, shard_rows_: int, rank: int) -> torch.Tensor:
    """Rank `rank`'s rows of `full`, zero-padded to `shard_rows_` rows (a view when no padding is needed)."""
    lo = min(rank * shard_rows_, full.shape[0])
    hi = min(lo + shard_rows_, full.shape[0])
    part = full[lo:hi]
    if hi - lo == shard_rows_:
        return part
    padded = torch.zeros((shard_rows_, *full.shape[1:]), dtype=full.dtype, device=full.device)
    padded[: hi - lo] = part
    return padded


def per_rank(t: Tensor, zero: dict[str, Any]) -> bool:
    """Does every rank hold a different value of this tensor (a shard, or sharded optimizer state)?"""
    if "shard" in t.attrs:
        return True
    if is_amax_history(t):  # an activation's follows the rank's own data
        return int(zero.get("world", 1)) > 1
    return bool(zero.get("optimizer")) and t.role in (Role.MASTER_WEIGHT, Role.OPTIMIZER_STATE)


def unsharded(plan: Plan) -> Plan:
    """The plan with every sharded tensor at its full shape: what the weight loaders check values against."""
    tensors = {n: dataclasses.replace(t, shape=tuple(t.attrs["full_shape"])) if "shard" in t.attrs else t
               for n, t in plan.tensors.items()}
    return dataclasses.replace(plan, tensors=tensors)


def initialise_rank(executor: Any, weights: dict[str, torch.Tensor], rank: int) -> None:
    """`runtime.weights.initialise` for one rank: write this rank's slice of every sharded weight, derive
    master shards from the full weights, zero the optimizer states."""
    plan: Plan = executor.plan
    for name, value in weights.items():
        if name not in executor.views:
            continue
        t = plan.tensors[name]
        if "shard" in t.attrs and t.dtype not in ("nf4", "fp4_e2m1"):
            value = rank_slice(value, t.shape[0], rank)
        elif "shard" in t.attrs:  # sub-byte codes: the kernel layout is one code per element, in full_shape
            value = rank_slice(value.reshape(t.attrs["full_shape"]), t.shape[0], rank)
        executor.write(name, value)
    for name, view in executor.views.items():
        t = plan.tensors[name]
        if t.role is Role.MASTER_WEIGHT:
            full = weights[t.attrs["master_of"]]
            value = rank_slice(full, view.shape[0], rank) if view.dim() and view.shape != full.shape else full
            view.copy_(value.to(view.dtype))
        elif t.role is Role.OPTIMIZER_STATE:
            init_optimizer_state(name, view, t.attrs.get("state", ""))


def full_views(plan: Plan, views: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`views` with every sharded weight replaced by the full tensor gathered from all ranks (a collective:
    every rank must call it, in the same order)."""
    out = dict(views)
    for name in sorted(views):
        t = plan.tensors[name]
        if "shard" in t.attrs and t.role in (Role.TRAINABLE_WEIGHT, Role.FROZEN_WEIGHT) and not t.attrs.get("transient"):
            full_shape = tuple(t.attrs["full_shape"])
            out[name] = comm.all_gather_rows(views[name], full_shape[0]).reshape(full_shape)
    return out
