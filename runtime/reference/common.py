"""Helpers shared by the reference kernels: document masks, RoPE tables, head reshapes."""

from __future__ import annotations

from typing import Any

import torch


def default_cu_seqlens(batch: int, seq: int) -> torch.Tensor:
    """One document per row, padded to B*T+1 entries by repeating the total (the graph's static shape)."""
    cu = torch.full((batch * seq + 1,), batch * seq, dtype=torch.int32)
    cu[: batch + 1] = torch.arange(batch + 1, dtype=torch.int32) * seq
    return cu


def doc_ids(cu_seqlens: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
    """[B, T] document index of every token (documents never span rows)."""
    tokens = torch.arange(batch * seq, dtype=torch.int64)
    return (torch.searchsorted(cu_seqlens.to(torch.int64), tokens, right=True) - 1).view(batch, seq)


def attention_mask(cu_seqlens: torch.Tensor, batch: int, seq: int, causal: bool) -> torch.Tensor:
    """[B, 1, T, T] bool: query i may attend key j (same document, and j <= i if causal)."""
    doc = doc_ids(cu_seqlens, batch, seq)
    mask = doc[:, :, None] == doc[:, None, :]
    if causal:
        mask &= torch.ones(seq, seq, dtype=torch.bool).tril()
    return mask[:, None]


def rope_tables(position_ids: torch.Tensor, attrs: dict, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin as [B, T, 1, head_dim], computed as transformers does (fp32, then cast)."""
    inv = torch.tensor(attrs["inv_freq"], dtype=torch.float32)
    freqs = position_ids.to(torch.float32)[..., None] * inv
    emb = torch.cat((freqs, freqs), dim=-1)
    scale = attrs.get("attention_scaling", 1.0)
    return (emb.cos() * scale).to(dtype)[:, :, None], (emb.sin() * scale).to(dtype)[:, :, None]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate_half_t(x: torch.Tensor) -> torch.Tensor:
    """Transpose of `rotate_half` (its inverse): used by RoPE backward."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x2, -x1), dim=-1)


def heads(x: torch.Tensor, n: int) -> torch.Tensor:
    """[B, T, n*d] -> [B, n, T, d]."""
    b, t, w = x.shape
    return x.view(b, t, n, w // n).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, n, T, d] -> [B, T, n*d]."""
    b, n, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, n * d)


def dropout_mask(shape: torch.Size, p: float, seed: int, step: int,
                 token_shard: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """Deterministic keep-mask for (seed, step): forward, backward and recompute regenerate the same one.
    `token_shard` (r, sp): the tensor is shard r of sp along dim 1 (sequence parallelism): its slice of the whole
    rows' mask, so the shards together drop what one process drops."""
    gen = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(step)) % (2**63))
    r, sp = token_shard
    if sp == 1:
        return torch.rand(shape, generator=gen) >= p
    t = shape[1]
    return (torch.rand((shape[0], t * sp, *shape[2:]), generator=gen) >= p)[:, r * t : (r + 1) * t]


def linear_scale(attrs: dict, ctx: Any) -> float:
    """A `linear` op's output factor: `scale`, times `dropout_scale` (1 / (1 - p) for a LoRA A reading the mask-only
    dropout, compiler/passes/lora.py) in training programs; evaluation's dropout is the identity."""
    scale = float(attrs.get("scale", 1.0))
    if "dropout_scale" in attrs and getattr(ctx, "training", True):
        scale *= float(attrs["dropout_scale"])
    return scale
