"""`Trainer.weights_finite` judges the weights, not scratch: a LoRA fold's [W | tail] buffer is written from B by each
forward, so a resumed run with no step left (the checkpoint completes it) found whatever the arena held there and
failed now and then with 'the model's weights hold NaN/Inf values'. The weights themselves are still checked."""

from __future__ import annotations

import torch

from surogate.compiler.ir import Role
from tests.runtime.helpers import build_trainer, save_model, text_cfg, write_text_data


def test_fold_buffers_are_not_weights_but_the_weights_are_checked(tmp_path):
    save_model(tmp_path / "model")
    cfg = text_cfg(tmp_path / "model", write_text_data(tmp_path / "train.jsonl", rows=16), tmp_path / "out",
                   lora=True, lora_rank=4, lora_alpha=8)
    trainer = build_trainer(cfg)
    folds = [n for n, t in trainer.plan.tensors.items() if t.attrs.get("fold") == "weight" and n in trainer.ex.views]
    tails = [n for n, t in trainer.plan.tensors.items() if t.attrs.get("fold") == "tail" and n in trainer.ex.views]
    assert folds and tails, "the plan folds no LoRA projection: this test checks nothing"
    for name in tails:  # what the arena may hold before the first forward
        trainer.ex.device_views[name].fill_(float("nan"))
    assert trainer.weights_finite()

    base = next(n for n, t in trainer.plan.tensors.items()
                if t.role is Role.FROZEN_WEIGHT and t.attrs.get("view", {}).get("of") in folds)
    trainer.ex.device_views[base][0, 0] = float("nan")  # a NaN in the frozen weight inside the fold
    assert not trainer.weights_finite()
    trainer.ex.device_views[base][0, 0] = 0.0
    lora_b = next(n for n, t in trainer.plan.tensors.items() if t.role is Role.TRAINABLE_WEIGHT and "lora_B" in n)
    trainer.ex.device_views[lora_b].view(-1)[0] = float("inf")
    assert not trainer.weights_finite()
    assert torch.isnan(trainer.ex.device_views[tails[0]]).all()  # the buffers were left as they were
