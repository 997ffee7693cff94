"""Resume with 2 ranks from a 2-rank checkpoint (ZeRO-3: weight and 8-bit state shards of every rank)
reproduces the uninterrupted run bitwise; the same checkpoint resumed by one process (same global batch)
is resharded and continues the same training; a different global batch is refused naming it."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from surogate.errors import UserError
from surogate.runtime.checkpoint import TENSORS_FILE
from surogate.runtime.session import run_training
from tests.distributed.helpers import cfg_for, exported, log_steps, make_root, max_rel

OPTS = dict(zero_level=3, max_steps=4, save_steps=2, validation_split_ratio=0.0, lora_dropout=0.1,
            resume_from_checkpoint=True)


def _interrupt_after_step_2(out):
    """As if the run had died after its step-2 checkpoint: no step-4 checkpoint, no outputs."""
    shutil.rmtree(out / "checkpoint-4")
    shutil.rmtree(out / "adapter")
    (out / "latest").write_text("checkpoint-2\n")


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    root = make_root(tmp_path_factory.mktemp("resume"))
    result = run_training(cfg_for(root, "run", gpus=2, accumulation=1, **OPTS), backend="cpu")
    out = root / "run"
    return root, result, load_file(str(out / "checkpoint-4" / TENSORS_FILE)), exported(out, lora=True), log_steps(out)


def test_two_rank_resume_is_bitwise(straight):
    root, result, final, adapter, log = straight
    out = root / "run"
    assert any(k.startswith("rank1/") for k in final) and any(k.startswith("rank0/") for k in final)
    shutil.copytree(out / "checkpoint-2", root / "saved-checkpoint-2")
    _interrupt_after_step_2(out)
    resumed = run_training(cfg_for(root, "run", gpus=2, accumulation=1, **OPTS), backend="cpu")
    assert resumed.losses == result.losses[2:]
    again = load_file(str(out / "checkpoint-4" / TENSORS_FILE))
    assert set(again) == set(final)
    for k in final:
        assert torch.equal(again[k], final[k]), k
    for k, v in exported(out, lora=True).items():
        assert torch.equal(v, adapter[k]), k
    assert log_steps(out)[4]["grad_norm"] == log[4]["grad_norm"]


def test_one_process_resumes_a_two_rank_checkpoint_resharded(straight):
    root, result, _, adapter, _ = straight
    out = root / "one"
    out.mkdir()
    shutil.copytree(root / "run" / "checkpoint-2", out / "checkpoint-2")
    (out / "latest").write_text("checkpoint-2\n")
    with pytest.raises(UserError, match=r"gradient_accumulation_steps x data-parallel replicas: 2 -> 1"):
        run_training(cfg_for(root, "one", gpus=1, accumulation=1, **OPTS), backend="cpu")
    resumed = run_training(cfg_for(root, "one", gpus=1, accumulation=2, **OPTS), backend="cpu")
    assert len(resumed.losses) == 2
    for a, b in zip(resumed.losses, result.losses[2:], strict=True):
        assert abs(a - b) <= 1e-5 * abs(b)
    got = exported(out, lora=True)
    assert set(got) == set(adapter)
    for k in adapter:
        # equal to fp32 rounding but for at most 2 elements: one process stacks the base projections'
        # GEMMs (group_lora_projections; ZeRO-3's sharded weights on two ranks are not stacked), so the sums
        # round differently and an 8-bit AdamW code may flip: one quantum of one update (seen: 1 element of
        # o_proj's B, 3.9e-3 of the tensor's max after 4 steps from B = 0)
        far = int(((got[k] - adapter[k]).abs() > 1e-5 * adapter[k].abs().max()).sum())
        assert far <= 2 and max_rel(got[k], adapter[k]) <= 1e-2, (k, far)


SP_OPTS = {**OPTS, "zero_level": 1, "lora_dropout": 0.0}


def test_sequence_parallel_resume_is_bitwise_and_may_change_the_split(tmp_path):
    """A 2-rank sequence-parallel run (one group) resumed as it was reproduces itself bitwise; resumed by one process
    (sequence_parallel_size 1, the same global batch: one replica either way) it continues the same training (fp32
    rounding: the attention's heads and tokens sum in another order). (A changed global batch is refused:
    tests/runtime/test_config_mismatch.py.)"""
    root = make_root(tmp_path)
    sp = dict(gpus=2, accumulation=2, sequence_parallel_size=2, **SP_OPTS)
    straight = run_training(cfg_for(root, "sp", **sp), backend="cpu")
    out = root / "sp"
    final = load_file(str(out / "checkpoint-4" / TENSORS_FILE))
    shutil.copytree(out / "checkpoint-2", root / "dp" / "checkpoint-2")
    (root / "dp" / "latest").write_text("checkpoint-2\n")
    _interrupt_after_step_2(out)
    resumed = run_training(cfg_for(root, "sp", **sp), backend="cpu")
    assert resumed.losses == straight.losses[2:]
    again = load_file(str(out / "checkpoint-4" / TENSORS_FILE))
    assert set(again) == set(final) and all(torch.equal(again[k], final[k]) for k in final)
    split_changed = run_training(cfg_for(root, "dp", gpus=1, accumulation=2, **SP_OPTS), backend="cpu")
    assert len(split_changed.losses) == 2
    for a, b in zip(split_changed.losses, straight.losses[2:], strict=True):
        assert abs(a - b) <= 1e-5 * abs(b)
