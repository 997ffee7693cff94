"""Resume a checkpoint written with another rank count or ZeRO layout: rebuild this rank's tensors.

Every per-rank tensor is first made whole (the ranks' dim-0 shards concatenated and cut to the full row
count), then cut again for this run's layout. Weights, master copies and NorMuon momenta move exactly;
NorMuon row variances are one value per output row and move with their rows; 8-bit AdamW moments are
dequantized with the old blocks and quantized again with this rank's blocks (when old and new shards both
hold multiples of 256 elements the blocks coincide and the codes come back unchanged, otherwise the
moments move by at most one quantization step).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from surogate.compiler.ir import Role, Tensor
from surogate.compiler.passes.precision import is_amax_history
from surogate.compiler.plan import Plan
from surogate.errors import UserError
from surogate.numba_kernels.quant8 import dequantize_blockwise_ref, dynamic_map, quantize_blockwise_ref
from surogate.runtime.distributed.shards import per_rank, rank_slice
from surogate.runtime.distributed.state import RANK_PREFIX

MOMENTS = {"m": ("m_absmax", True), "v": ("v_absmax", False)}  # codes -> (absmax state, signed map)
QBLOCK = 256


def layout(plan: Plan) -> dict[str, Any]:
    """What decides how a run's checkpoint tensors are cut: rank count and which categories are sharded."""
    zero = plan.meta.get("zero", {})
    return {k: zero.get(k, 1 if k == "world" else False) for k in ("world", "optimizer", "gradients", "weights")}


def _pieces(tensors: dict[str, torch.Tensor], name: str, old_world: int) -> list[torch.Tensor] | None:
    if f"{RANK_PREFIX.format(0)}{name}" in tensors:
        return [tensors[f"{RANK_PREFIX.format(r)}{name}"] for r in range(old_world)]
    return [tensors[name]] if name in tensors else None


def _full_rows(plan: Plan, t: Tensor) -> tuple[int, int]:
    """(rows of the full tensor along dim 0, values per dim-0 row for a per-row state)."""
    owner = plan.tensors[t.attrs["state_of"]] if "state_of" in t.attrs else t
    shape = tuple(owner.attrs.get("full_shape", owner.shape))
    if t.attrs.get("state") == "row_variance":  # one value per output row of each matrix
        return shape[0], math.prod(shape[1:-1])
    return shape[0], 1


def _whole(pieces: list[torch.Tensor], rows: int, per_row: int) -> torch.Tensor:
    if per_row > 1:
        pieces = [p.reshape(-1, per_row) for p in pieces]
    return torch.cat(pieces, 0)[:rows]


def _zero_code(signed: bool) -> int:
    return int(torch.nonzero(dynamic_map(signed) == 0)[0, 0])


def _moment(codes: list[torch.Tensor], absmax: list[torch.Tensor], signed: bool, rows: int, shape: tuple,
            rank: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes in `shape`, absmax) of `rank`'s shard (None: the whole tensor) of a moment stored as `codes` /
    `absmax` pieces (the old ranks' shards). Block-aligned pieces and slice move as codes (exact); otherwise the
    values are dequantized and quantized again in the new blocks."""
    cols = math.prod(shape[1:])
    count = math.prod(shape)
    lo = min(rank * shape[0], rows) if rank is not None else 0
    aligned = (len(codes) == 1 or all(c.numel() % QBLOCK == 0 for c in codes)) and (lo * cols) % QBLOCK == 0 \
        and (count % QBLOCK == 0 or lo + shape[0] >= rows)
    if aligned:
        flat = torch.cat([c.reshape(-1) for c in codes])[: rows * cols]
        blocks = torch.cat(list(absmax))
        start, b0 = lo * cols, lo * cols // QBLOCK
        out = torch.full((count,), _zero_code(signed), dtype=torch.uint8)
        take = max(0, min(count, flat.numel() - start))
        out[:take] = flat[start : start + take]
        scale = torch.zeros(-(-count // QBLOCK), dtype=torch.float32)
        have = max(0, min(scale.numel(), blocks.numel() - b0))
        scale[:have] = blocks[b0 : b0 + have]
        return out.reshape(shape), scale
    qmap = dynamic_map(signed)
    values = [dequantize_blockwise_ref(c.reshape(-1), a, qmap, QBLOCK).reshape(c.shape)
              for c, a in zip(codes, absmax, strict=True)]
    full = _whole(values, rows, 1)
    part = rank_slice(full, shape[0], rank) if rank is not None else full
    new_codes, scale = quantize_blockwise_ref(part, qmap, QBLOCK)
    return new_codes.reshape(shape), scale


def reshard(tensors: dict[str, torch.Tensor], old_world: int, plan: Plan, rank: int) -> dict[str, torch.Tensor]:
    """Plan tensor name -> this rank's value, from a checkpoint's tensors of any world size and layout."""
    zero = plan.meta.get("zero", {})
    out: dict[str, torch.Tensor] = {}
    for name, t in plan.tensors.items():
        if is_amax_history(t):  # per-rank fp8 state: the same rank's, else rank 0's (a scale to start from)
            pieces = _pieces(tensors, name, old_world)
            if pieces is not None:
                out[name] = pieces[rank if rank < len(pieces) else 0]
            continue
        if t.role not in (Role.TRAINABLE_WEIGHT, Role.MASTER_WEIGHT, Role.OPTIMIZER_STATE) or t.attrs.get("transient"):
            continue
        kind = t.attrs.get("state", "")
        if kind in ("m_absmax", "v_absmax"):
            continue  # written with its codes
        pieces = _pieces(tensors, name, old_world)
        if pieces is None:
            continue
        rows, per_row = _full_rows(plan, t)
        sharded = per_rank(t, zero)
        if kind in MOMENTS:
            absmax_name = f"{t.attrs['state_of']}@{MOMENTS[kind][0]}"
            absmax = _pieces(tensors, absmax_name, old_world)
            if absmax is None or len(absmax) != len(pieces):
                raise UserError(f"checkpoint: {absmax_name} is missing or sharded unlike {name}")
            out[name], out[absmax_name] = _moment(pieces, absmax, MOMENTS[kind][1], rows, tuple(t.shape),
                                                  rank if sharded else None)
            continue
        full = _whole(pieces, rows, per_row)
        shard = rank_slice(full, t.shape[0] // per_row, rank) if sharded else full
        out[name] = shard.reshape(t.shape).to(pieces[0].dtype)
    return out
