"""Resume with 2 ranks from a 2-rank checkpoint (ZeRO-3: weight, master and 8-bit state shards of every
rank) reproduces the uninterrupted run bitwise; a checkpoint from another rank count is refused clearly."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from surogate.errors import UserError
from surogate.runtime.checkpoint import TENSORS_FILE
from surogate.runtime.distributed.state import check_world
from surogate.runtime.session import run_training
from tests.distributed.helpers import cfg_for, exported, log_steps, make_root


def test_two_rank_resume_is_bitwise(tmp_path):
    root = make_root(tmp_path)
    opts = dict(gpus=2, accumulation=1, zero_level=3, max_steps=4, save_steps=2, eval_steps=1000,
                validation_split_ratio=0.0, lora_dropout=0.1, resume_from_checkpoint=True)
    straight = run_training(cfg_for(root, "run", **opts), backend="cpu")
    out = root / "run"
    final = load_file(str(out / "checkpoint-4" / TENSORS_FILE))
    assert any(k.startswith("rank1/") for k in final) and any(k.startswith("rank0/") for k in final)
    adapter = exported(out, lora=True)
    log = log_steps(out)
    # interrupted after step 2: the step-4 checkpoint and the outputs never happened
    shutil.rmtree(out / "checkpoint-4")
    shutil.rmtree(out / "adapter")
    (out / "latest").write_text("checkpoint-2\n")
    resumed = run_training(cfg_for(root, "run", **opts), backend="cpu")
    assert resumed.losses == straight.losses[2:]
    again = load_file(str(out / "checkpoint-4" / TENSORS_FILE))
    assert set(again) == set(final)
    for k in final:
        assert torch.equal(again[k], final[k]), k
    for k, v in exported(out, lora=True).items():
        assert torch.equal(v, adapter[k]), k
    assert log_steps(out)[4]["grad_norm"] == log[4]["grad_norm"]


def test_checkpoint_of_another_world_size_is_a_user_error(tmp_path):
    ckpt = SimpleNamespace(path=tmp_path / "checkpoint-2", state={"world": 2})
    with pytest.raises(UserError, match="written by a 2-rank run; this run has 4 rank"):
        check_world(ckpt, 4)
    check_world(ckpt, 2)  # same world: fine
