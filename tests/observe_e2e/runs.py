"""Shared pieces of the end-to-end observability tests: a tiny model and data built once, a config
builder for real `run_training` runs on the cpu backend, fault injection into the cpu backend's kernels, and
recorders of the state and the learning rate the optimizer really used.

Nothing here re-implements the runtime: runs go through `surogate.runtime.session.run_training`, the
model/data builders are imported from `tests/runtime/helpers.py`, faults are injected by wrapping the cpu
backend's real kernels (`lm_head_ce`, `lm_head_ce_bwd`).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from surogate.runtime.backends.cpu import KERNELS
from surogate.runtime.session import run_training
from surogate.runtime.trainer import Trainer, TrainResult
from tests.runtime.helpers import make_cfg, save_model, write_text_data

SEQ = 64


def build_source(root: Path, rows: int = 64, words: tuple[int, int] = (4, 14), **model: Any) -> tuple[Path, Path]:
    """A tiny random fp32 Qwen3 model (with tokenizer; `model` overrides its HF config) and a learnable text
    dataset of `rows` rows of `words` (min, max) words under `root`."""
    data = write_text_data(root / "data.jsonl", rows=rows, min_words=words[0], max_words=words[1])
    return save_model(root / "model", **model), data


def train_cfg(source: tuple[Path, Path], out: Path, **over: Any):
    """A validated config for a seconds-long CPU run writing everything under `out`."""
    model, data = source
    base = dict(datasets=[{"path": str(data), "type": "text"}], output_dir=str(out / "out"), sequence_len=SEQ,
                learning_rate=1e-3, gradient_accumulation_steps=1, save_steps=1000, eval_steps=1000)
    return make_cfg(model, **{**base, **over})


def train(cfg: Any) -> tuple[TrainResult, str]:
    """Run `cfg` to its end with the console captured; returns (result, console text)."""
    buf = io.StringIO()
    result = run_training(cfg, console_file=buf, force_terminal=False)
    return result, buf.getvalue()


def inject_fault(monkeypatch: pytest.MonkeyPatch, kernel: str, factor: Callable[[int], float | None],
                 output: int = 0) -> list[int]:
    """Wrap the cpu backend's `kernel` so that at micro-step `ctx.step` its output `output` is multiplied by
    factor(ctx.step) (None: untouched). The executor looks kernels up when it is built, so call this before
    `run_training`. Training runs the loss and its backward as one op, `lm_head_ce_fwd_bwd` (pass
    fuse_lm_head_ce): its output 0 is the loss (what the loop reads; the gradient is computed from the logits,
    so it stays true), output 2 the gradient flowing into the model (`LOSS` and `GRAD` below).

    Micro-step indices are global: optimizer step s (1-based), micro-batch i -> (s - 1) * accumulation + i.
    Evaluation runs the forward with ctx.step 0, so index 0 is never faulted. Returns the faulted indices.
    """
    real = KERNELS[kernel]
    hit: list[int] = []

    def faulty(ins: list, attrs: dict, ctx: Any) -> list:
        outs = list(real(ins, attrs, ctx))
        f = factor(ctx.step) if ctx.step > 0 else None
        if f is not None:
            hit.append(ctx.step)
            outs[output] = outs[output] * f
        return outs

    monkeypatch.setitem(KERNELS, kernel, faulty)
    return hit


LOSS_OP = "lm_head_ce_fwd_bwd"
LOSS, GRAD = 0, 2  # its outputs: the loss, the gradient into the model


def inject_loss_fault(monkeypatch: pytest.MonkeyPatch, factor: Callable[[int], float | None]) -> list[int]:
    """`inject_fault` on the loss reported by the loss op."""
    return inject_fault(monkeypatch, LOSS_OP, factor, LOSS)


def inject_grad_fault(monkeypatch: pytest.MonkeyPatch, factor: Callable[[int], float | None]) -> list[int]:
    """`inject_fault` on the gradient the loss op sends into the model."""
    return inject_fault(monkeypatch, LOSS_OP, factor, GRAD)


def record_optimizer_lr(monkeypatch: pytest.MonkeyPatch, kernel: str = "adamw8bit_step") -> dict[int, float]:
    """{applied optimizer step (1-based): the learning rate the optimizer kernel `kernel` used}, recorded
    from the real kernel calls of the next run (`attrs["lr"] * ctx.lr_scale`, as the kernel computes it)."""
    real = KERNELS[kernel]
    used: dict[int, float] = {}

    def recording(ins: list, attrs: dict, ctx: Any) -> list:
        lr = float(attrs["lr"]) * float(ctx.lr_scale)
        assert used.setdefault(ctx.optimizer_step, lr) == lr, "one LR per step for every parameter"
        return real(ins, attrs, ctx)

    monkeypatch.setitem(KERNELS, kernel, recording)
    return used


def record_states(monkeypatch: pytest.MonkeyPatch) -> dict[int, dict[str, torch.Tensor]]:
    """Snapshot the checkpointed state (trainable/master weights, optimizer moments) after every optimizer
    step of the next run: {step: {tensor name: copy}}; key 0 is the state before the first step."""
    states: dict[int, dict[str, torch.Tensor]] = {}
    real = Trainer.train_step

    def train_step(self: Trainer) -> tuple:
        if not states:
            states[0] = {k: v.clone() for k, v in self.state_tensors().items()}
        out = real(self)
        states[self.step] = {k: v.clone() for k, v in self.state_tensors().items()}
        return out

    monkeypatch.setattr(Trainer, "train_step", train_step)
    return states


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
