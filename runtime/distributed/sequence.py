"""Sequence parallelism at run time: the rank's groups, its token shard of each micro-batch, and the all-to-all
kernels of `seq_to_heads` / `heads_to_seq` (the design: compiler/models/sequence_parallel.py).

A world of `world` ranks with `sp`-way sequence parallelism is `world / sp` data-parallel replicas of a group of
`sp` consecutive ranks: rank r is data-parallel rank r // sp and holds shard r % sp of its group's rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from surogate.runtime.distributed import comm

_GROUPS: dict[tuple[int, int], Any] = {}  # (world, sp) -> this rank's sequence-parallel process group


@dataclass(frozen=True)
class Placement:
    """Where this rank sits: its data-parallel replica and its shard of the replica's sequences."""

    dp_rank: int
    dp_world: int
    sp_rank: int
    sp: int


def placement(plan: Any, rank: int, world: int) -> Placement:
    sp = plan_sp(plan)
    return Placement(rank // sp, max(1, world // sp), rank % sp, sp)


def plan_sp(plan: Any) -> int:
    return int(plan.meta.get("sequence_parallel", 1) or 1)


def init_groups(sp: int) -> None:
    """Create the sequence-parallel process groups (a collective: every rank calls it, with the same `sp`)."""
    if sp <= 1 or not comm.initialized():
        return
    import torch.distributed as dist

    world, rank = comm.world(), comm.rank()
    if (world, sp) in _GROUPS:
        return
    mine = None
    for start in range(0, world, sp):  # every rank creates every group, in the same order (torch's rule)
        group = dist.new_group(list(range(start, start + sp)))
        if start <= rank < start + sp:
            mine = group
    _GROUPS[(world, sp)] = mine


def group(sp: int) -> Any:
    """This rank's sequence-parallel group (created by `init_groups`)."""
    try:
        return _GROUPS[(comm.world(), sp)]
    except KeyError:
        from surogate.errors import NotAvailableError

        raise NotAvailableError(f"sequence_parallel_size {sp}: this process is in no sequence-parallel group of "
                                f"{sp} ranks (world {comm.world()}); a sequence-parallel plan runs on its ranks, "
                                "started by `surogate sft` / `surogate run` or torchrun") from None


def token_shard(inputs: dict[str, torch.Tensor], sp: int, sp_rank: int) -> dict[str, torch.Tensor]:
    """A micro-batch's plan inputs cut to this rank's tokens: columns [sp_rank*T/sp, (sp_rank+1)*T/sp) of the
    per-token inputs (ids, pre-shifted labels, positions, loss weights); `cu_seqlens` (whole rows) and `num_items`
    stay as they are."""
    if sp == 1:
        return inputs
    out = dict(inputs)
    for name in ("input_ids", "labels", "position_ids", "loss_weights"):
        if name in inputs:
            full = inputs[name]
            local = full.shape[1] // sp
            out[name] = full[:, sp_rank * local : (sp_rank + 1) * local].contiguous()
    return out


def _all_to_all(chunks: torch.Tensor, sp: int) -> torch.Tensor:
    """`chunks` [sp, ...]: chunk j goes to group rank j; returns [sp, ...] with chunk i from group rank i."""
    import torch.distributed as dist

    chunks = chunks.contiguous()
    received = torch.empty_like(chunks)
    dist.all_to_all_single(received, chunks, group=group(sp))
    return received


def seq_to_heads(ins: list, attrs: dict, ctx: Any) -> list:
    """[B, T/sp, heads*hd] (this rank's tokens) -> [B, T, heads*repeats/sp*hd] (every token, this rank's heads; with
    `repeats` > 1 each head is sent `repeats` times: key/value heads fewer than the group)."""
    x, sp, rep = ins[0], int(attrs["sp"]), int(attrs.get("repeats", 1))
    b, local, width = x.shape
    if rep > 1:
        hd = int(attrs["head_dim"])
        x = x.reshape(b, local, width // hd, 1, hd).expand(-1, -1, -1, rep, -1)  # head h -> heads h*rep .. h*rep+rep-1
        width *= rep
    part = width // sp
    send = x.reshape(b, local, sp, part).permute(2, 0, 1, 3)  # [sp, B, T/sp, part]: head shard j for rank j
    got = _all_to_all(send, sp)  # [sp, B, T/sp, part]: token shard i from rank i
    return [got.permute(1, 0, 2, 3).reshape(b, sp * local, part)]


def heads_to_seq(ins: list, attrs: dict, ctx: Any) -> list:
    """[B, T, heads*repeats/sp*hd] (every token, this rank's heads) -> [B, T/sp, heads*hd] (this rank's tokens; the
    `repeats` copies of each head summed: the gradient of a repeated send)."""
    x, sp, rep = ins[0], int(attrs["sp"]), int(attrs.get("repeats", 1))
    b, whole, part = x.shape
    local = whole // sp
    send = x.reshape(b, sp, local, part).permute(1, 0, 2, 3)  # [sp, B, T/sp, part]: token shard j for rank j
    got = _all_to_all(send, sp)  # [sp, B, T/sp, part]: head shard i from rank i
    out = got.permute(1, 2, 0, 3).reshape(b, local, sp * part)
    if rep > 1:
        hd = int(attrs["head_dim"])
        out = out.reshape(b, local, sp * part // (hd * rep), rep, hd).sum(3).reshape(b, local, sp * part // rep)
    return [out]


KERNELS = {"seq_to_heads": seq_to_heads, "heads_to_seq": heads_to_seq}
