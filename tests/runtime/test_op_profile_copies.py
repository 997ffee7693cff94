"""benchmarks/op_profile.py times the offload copies on the stream they run on: each copy op of a training step
is recorded once, under its copy kind and the host tensor's role, and the copies still do their work (the step
equals an untimed one). CUDA events are replaced by a recording stand-in (no GPU here)."""

from __future__ import annotations

from collections import Counter

import torch

from surogate.runtime.offload_copies import COPY_KINDS, OffloadCopies
from tests.runtime.helpers import build_trainer, save_model, text_cfg, write_text_data
from tests.scripts import load_script


class _Event:
    """torch.cuda.Event's record/elapsed_time on a counter."""

    clock = 0

    def __init__(self, enable_timing: bool = False) -> None:
        self.at = None

    def record(self, stream=None) -> None:
        _Event.clock += 1
        self.at = _Event.clock

    def elapsed_time(self, end: _Event) -> float:
        return float(end.at - self.at)


def test_every_offload_copy_is_timed_once_under_its_kind_and_role(tmp_path, monkeypatch):
    op_profile = load_script("benchmarks/op_profile.py")
    model, data = save_model(tmp_path / "model", "qwen3"), write_text_data(tmp_path / "train.jsonl", rows=40)

    def trainer(name):
        cfg = text_cfg(model, data, tmp_path / name, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                       max_steps=1, learning_rate=1e-2, lora=False, offload_grads=True, zero_level=2,
                       offload_optimizer=True)
        return build_trainer(cfg)

    timed, plain = trainer("timed"), trainer("plain")
    monkeypatch.setattr(torch.cuda, "Event", _Event)
    events: list = []
    op_profile.timed_copies(timed.ex.copies, timed.plan, events)
    assert timed.train_step()[:2] == plain.train_step()[:2]  # the wrapped copies still copy
    micro = [op for op in timed.ex.programs["micro_step"] if op.kind in COPY_KINDS]
    optim = [op for op in timed.ex.programs["optimizer_step"] if op.kind in COPY_KINDS]
    assert micro and optim
    want = Counter()
    for op in micro * 2 + optim:  # two micro-steps, one optimizer step
        host = op.inputs[0] if op.kind == "copy_h2d" else op.outputs[0]
        want[f"{op.kind}:{timed.plan.tensors[host].role.value}"] += 1
    got = Counter(kind for kind, _, _ in events)
    assert got == want
    assert {k.split(":")[1] for k in got} >= {"gradient", "optimizer_state"}
    assert all(start.elapsed_time(end) == 1.0 for _, start, end in events)  # start/end around the copy itself
    del timed.ex.copies.issue  # what op_profile does before its profiler pass: the class's method again
    assert timed.ex.copies.issue.__func__ is OffloadCopies.issue
