"""Offloading moves tensors between arenas, it does not change the arithmetic: with host copies of gradients,
optimizer states, masters or residuals (and gradient accumulation, where an offloaded gradient must be *added*
into its host copy every micro-step) the executor trains exactly like the plain plan."""

from __future__ import annotations

import pytest
import torch

from surogate.runtime.offload_copies import DeferredStreams, OffloadCopies
from tests.runtime.helpers import build_trainer, save_model, text_cfg, write_text_data

OPTIONS = {
    "offload_grads": dict(offload_grads=True, zero_level=2),
    "shard_gradients": dict(offload_grads=True, shard_gradients=True),
    "offload_optimizer": dict(offload_optimizer=True),
    "offload_master": dict(offload_master=True, master_dtype="fp32", lora=True, lora_dtype="bf16"),
    "offload_residual": dict(offload_residual=True),
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("offload")
    return save_model(root / "model", "qwen3"), write_text_data(root / "train.jsonl", rows=40), root


def _run(setup, name, streams=None, **over):
    """Two steps of the offload job; `streams`: how the executor runs its copies (default inline)."""
    model, data, root = setup
    over.setdefault("lora", False)
    cfg = text_cfg(model, data, root / name, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                   max_steps=2, learning_rate=1e-2, **over)
    trainer = build_trainer(cfg)
    if streams is not None:
        trainer.ex.copies.streams = streams
    steps = [trainer.train_step()[:2] for _ in range(2)]
    return trainer, steps


@pytest.mark.parametrize("option", list(OPTIONS))
def test_offloaded_plan_trains_like_the_plain_plan(setup, option):
    over = OPTIONS[option]
    trainer, steps = _run(setup, option, **over)
    assert "host" in trainer.plan.arenas and trainer.plan.arenas["host"] > 0  # something really is offloaded
    plain_over = {k: v for k, v in over.items() if k in ("lora", "lora_dtype", "master_dtype")}
    plain, plain_steps = _run(setup, f"{option}-plain", **plain_over)
    assert steps == plain_steps  # (loss, grad norm) of both steps, bitwise
    ours, ref = trainer.state_tensors(), plain.state_tensors()
    assert set(ours) == set(ref)
    for name in ref:
        assert torch.equal(ours[name], ref[name]), name


# -- the copies run asynchronously on a GPU: emulated here by running each as late as the ordering allows --------

DEFERRED = ["offload_grads", "offload_optimizer", "offload_master", "offload_residual"]


@pytest.mark.parametrize("option", DEFERRED)
def test_deferred_copies_train_like_inline_copies(setup, option):
    """Every copy runs only when a compute op waits for it (or at the program's end): a missing wait would
    read a load's staging buffer before it is filled, or store a buffer after the arena reused it."""
    over = OPTIONS[option]
    streams = DeferredStreams()
    trainer, steps = _run(setup, f"{option}-deferred", streams, **over)
    inline, inline_steps = _run(setup, f"{option}-inline", **over)
    assert streams.deferred_runs == streams.issued > 0 and not streams.queue
    assert steps == inline_steps
    ours, ref = trainer.state_tensors(), inline.state_tensors()
    for name in ref:
        assert torch.equal(ours[name], ref[name]), name


def test_deferred_copies_without_the_waits_go_wrong(setup, monkeypatch):
    """The emulation can fail: with compute never waiting for a copy, training reads unfilled staging memory."""
    monkeypatch.setattr(OffloadCopies, "before", lambda self, op: None)
    over = OPTIONS["offload_residual"]
    _, steps = _run(setup, "no-waits", DeferredStreams(), **over)
    _, inline_steps = _run(setup, "no-waits-inline", **over)
    assert steps != inline_steps
