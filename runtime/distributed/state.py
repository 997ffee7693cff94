"""Checkpoints of a multi-rank run: one atomic checkpoint folder holding every rank's state.

Rank 0 gathers each rank's per-rank tensors (optimizer-state and master shards, ZeRO-3 weight shards)
and writes them as `rank{r}/{name}` beside the replicated tensors (one copy, plain names) through the
ordinary `CheckpointManager` (atomic, rotated, verified). `state.json` records the rank count and
ZeRO layout; a run with another one reshards the checkpoint (`reshard`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from surogate.compiler.plan import Plan
from surogate.runtime.distributed import comm
from surogate.runtime.distributed.shards import per_rank

RANK_PREFIX = "rank{}/"


def save_all_ranks(manager: Any, plan: Plan, step: int, tensors: dict[str, torch.Tensor],
                   state: dict[str, Any]) -> Path:
    """Collective: every rank calls it; rank 0 writes; every rank gets the checkpoint's folder."""
    zero = plan.meta.get("zero", {})
    mine = {n: v.detach().cpu().clone() for n, v in tensors.items() if per_rank(plan.tensors[n], zero)}
    gathered = comm.gather_to_main(mine)
    path = None
    if comm.rank() == 0:
        merged = {n: v for n, v in tensors.items() if not per_rank(plan.tensors[n], zero)}
        for r, part in enumerate(gathered or []):
            merged |= {RANK_PREFIX.format(r) + n: v for n, v in part.items()}
        path = str(manager.save(step, merged, state))
    return Path(comm.broadcast(path))


def rank_tensors(checkpoint: Any, plan: Plan, rank: int, world: int) -> dict[str, torch.Tensor]:
    """This rank's view of a loaded checkpoint: plan tensor name -> value."""
    if world == 1:
        return checkpoint.tensors
    zero = plan.meta.get("zero", {})
    prefix = RANK_PREFIX.format(rank)
    out = {}
    for name, t in plan.tensors.items():
        key = prefix + name if per_rank(t, zero) else name
        if key in checkpoint.tensors:
            out[name] = checkpoint.tensors[key]
    return out


def find_latest(manager: Any) -> Path | None:
    """Rank 0 looks for the newest complete checkpoint (and tidies interrupted saves); every rank gets it."""
    found = manager.latest() if comm.rank() == 0 else None
    found = comm.broadcast(str(found) if found is not None else None)
    return Path(found) if found is not None else None
