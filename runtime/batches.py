"""Micro-batches for the executor: a resumable stream over epochs, and the plan's input tensors.

The data pipeline yields labels aligned with input_ids (HF convention, the model shifts); the plan's
loss op reads *pre-shifted* labels (target of position t at t). Every document's first token has
label -100, so shifting a whole packed row never makes one document predict another.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from surogate.compiler.plan import Plan
from surogate.runtime.distributed.sequence import plan_sp, token_shard


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """HF labels -> the plan's pre-shifted labels (the last position of each row predicts nothing)."""
    out = torch.full_like(labels, -100)
    out[:, :-1] = labels[:, 1:]
    return out


def plan_inputs(plan: Plan, batch: dict[str, Any], num_items: float | None = None,
                sp_rank: int = 0) -> dict[str, torch.Tensor]:
    """The plan's INPUT tensors for one micro-batch, in the plan's shapes and dtypes.

    `num_items` is the loss denominator: the loss tokens of the whole optimizer step, so that the
    accumulated micro-step gradients equal one batch's (default: this micro-batch's own count).
    A sequence-parallel plan takes shard `sp_rank` of each row's tokens (labels shifted over the whole row).
    """
    ids = torch.as_tensor(batch["input_ids"])
    sp = plan_sp(plan)
    b, t = plan.tensors["input_ids"].shape
    want = (b, t * sp)
    if tuple(ids.shape) != tuple(want):
        raise ValueError(f"micro-batch shape {tuple(ids.shape)} != the plan's {tuple(want)}")
    cu = torch.as_tensor(batch["cu_seqlens"]).to(torch.int32)
    size = plan.tensors["cu_seqlens"].shape[0]
    if cu.numel() > size:
        raise ValueError(f"micro-batch has {cu.numel() - 1} segments; the plan holds at most {size - 1}")
    # Unused tail entries repeat the total: zero-length segments (the buffer's size never changes).
    padded = torch.full((size,), int(ids.numel()), dtype=torch.int32)
    padded[: cu.numel()] = cu
    labels = shift_labels(torch.as_tensor(batch["labels"]))
    if num_items is None:
        num_items = int((labels != -100).sum())
    inputs = {
        "input_ids": ids.to(torch.int32),
        # (a step's share can be below 1: its loss tokens / ranks, with fewer loss tokens than ranks)
        "num_items": torch.tensor(float(num_items) if num_items > 0 else 1.0),
        "labels": labels.to(torch.int32),
        "position_ids": torch.as_tensor(batch["position_ids"]).to(torch.int32),
        "cu_seqlens": padded,
    }
    if "loss_weights" in plan.tensors:  # a custom loss_scale: per-token weights, shifted as the labels are
        inputs["loss_weights"] = shift_weights(batch.get("loss_weights"), labels)
    return token_shard(inputs, sp, sp_rank)


def shift_weights(weights: Any, shifted_labels: torch.Tensor) -> torch.Tensor:
    """HF-aligned per-token loss weights -> the plan's pre-shifted ones (fp32); without any (rows from data
    tokenized without a custom loss_scale), 1 for every target token."""
    if weights is None:
        return (shifted_labels != -100).float()
    w = torch.as_tensor(weights, dtype=torch.float32)
    out = torch.zeros_like(w)
    out[:, :-1] = w[:, 1:]
    return out


@dataclass
class Position:
    """Where the stream is: the next batch to read is batch `index` of epoch `epoch`."""

    epoch: int = 0
    index: int = 0


class BatchStream:
    """Training batches epoch after epoch, in the split's deterministic (seeded) order; resumable."""

    def __init__(self, split: Any, batch_size: int, seed: int, start: Position | None = None) -> None:
        self.split = split
        self.batch_size = batch_size
        self.seed = seed
        self.position = start or Position()
        self.batches_per_epoch = split.num_batches(batch_size)
        if self.batches_per_epoch < 1:
            raise ValueError("the training split has no batches")
        self._iter: Iterator[dict] | None = None

    def _open(self) -> None:
        it = self.split.batches(self.batch_size, epoch=self.position.epoch, seed=self.seed)
        for _ in range(self.position.index):  # skip what a resumed run already trained on
            next(it)
        self._iter = it

    def next(self) -> tuple[Position, dict]:
        """The next batch and the position it was read from."""
        if self.position.index >= self.batches_per_epoch:
            self.position = Position(self.position.epoch + 1, 0)
            self._iter = None
        if self._iter is None:
            self._open()
        where = Position(self.position.epoch, self.position.index)
        batch = next(self._iter)
        self.position.index += 1
        return where, batch
