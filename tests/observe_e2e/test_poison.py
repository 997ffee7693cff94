"""Poisoned batches in real CPU runs: a non-finite loss skips the step (state untouched), is logged with
step and micro-batch, training goes on to finite weights; repeated poison fails the run with the last good state
saved; weights that are themselves NaN/Inf fail it at once, and nothing is exported."""

from __future__ import annotations

import math

import torch
from transformers import AutoModelForCausalLM

from surogate.runtime.backends.cpu import KERNELS
from surogate.runtime.checkpoint import CheckpointManager
from surogate.runtime.observe import read_log
from tests.observe_e2e.runs import (
    LOSS,
    LOSS_OP,
    inject_grad_fault,
    inject_loss_fault,
    record_states,
    same_state,
    train,
    train_cfg,
)


def test_one_poisoned_micro_batch_is_skipped_and_training_goes_on(source, tmp_path, monkeypatch):
    accumulation, total = 2, 8
    poisoned = (4 - 1) * accumulation + 1  # step 4, micro-batch 1
    hit = inject_loss_fault(monkeypatch, lambda i: math.inf if i == poisoned else None)
    states = record_states(monkeypatch)
    cfg = train_cfg(source, tmp_path, max_steps=total, gradient_accumulation_steps=accumulation,
                    log_file=str(tmp_path / "log.jsonl"))
    result, console = train(cfg)
    assert hit == [poisoned]
    assert result.steps == total and result.stopped is None and len(result.losses) == total - 1
    # the poisoned step changed nothing (weights, master weights, optimizer moments); its neighbours did
    assert same_state(states[3], states[4])
    assert not same_state(states[2], states[3]) and not same_state(states[4], states[5])
    log = read_log(cfg.log_file)
    (event,) = [e for e in log.events if e.get("event") == "nonfinite"]
    assert (event["step"], event["micro_batch"], event["what"]) == (4, 1, "loss")
    assert "non-finite loss at step 4, micro-batch 1: update skipped" in console
    assert [r["step"] for r in log.steps] == [1, 2, 3, 5, 6, 7, 8]
    assert log.events[-1]["status"] == "completed"
    # the exported model loads, is finite, trained past the poison, and gives a finite loss
    model, info = AutoModelForCausalLM.from_pretrained(result.outputs["model"], dtype=torch.float32,
                                                       output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]  # nothing was randomly re-initialised
    initial = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32).state_dict()
    params = model.state_dict()
    assert all(torch.isfinite(p).all() for p in params.values())
    assert any(not torch.equal(params[k], initial[k]) for k in initial)
    ids = torch.randint(3, 90, (2, 16), generator=torch.Generator().manual_seed(0))
    assert math.isfinite(model(input_ids=ids, labels=ids).loss.item())


def test_repeated_poison_stops_with_the_last_good_state(source, tmp_path, monkeypatch):
    inject_loss_fault(monkeypatch, lambda i: math.nan if i >= 2 else None)  # every step from step 3 on
    states = record_states(monkeypatch)
    cfg = train_cfg(source, tmp_path, max_steps=20, log_file=str(tmp_path / "log.jsonl"))
    result, console = train(cfg)
    assert result.steps == 5 and result.skipped == [3, 4, 5]  # 3 in a row is the limit
    assert result.stopped is not None and result.stopped.startswith("3 consecutive steps with non-finite loss")
    assert f"stopping at step 5: {result.stopped}; the run failed" in console
    # the run failed: the last good state is checkpointed, the model is not exported as if trained
    ckpt = tmp_path / "out" / "checkpoint-5"
    assert result.failed == f"{result.stopped}; {ckpt} holds the last good state (after step 2)"
    assert result.outputs == {"checkpoint": str(ckpt)} and not (tmp_path / "out" / "model").exists()
    log = read_log(cfg.log_file)
    assert [e["step"] for e in log.events if e.get("event") == "nonfinite"] == [3, 4, 5]
    assert [e["step"] for e in log.events if e.get("event") == "nonfinite_stop"] == [5]
    assert (log.events[-1]["status"], log.events[-1]["stop_reason"]) == ("failed", result.failed)
    # the checkpoint written at the stop holds the state after step 2, the last applied step
    mgr = CheckpointManager.from_config(cfg)
    ck = mgr.load(mgr.latest())
    assert ck.state["step"] == 5 and ck.state["applied"] == 2
    assert same_state({k: ck.tensors[k] for k in states[2]}, states[2])
    assert not same_state(states[2], states[0])
    assert all(torch.isfinite(t).all() for t in ck.tensors.values() if t.is_floating_point())


def test_non_finite_gradients_skip_the_step(source, tmp_path, monkeypatch):
    """A finite loss with an inf gradient (the backward of the loss blows up at step 3) is skipped too."""
    hit = inject_grad_fault(monkeypatch, lambda i: math.inf if i == 2 else None)
    states = record_states(monkeypatch)
    cfg = train_cfg(source, tmp_path, max_steps=5, log_file=str(tmp_path / "log.jsonl"))
    result, console = train(cfg)
    assert hit == [2] and result.steps == 5 and result.stopped is None
    assert same_state(states[2], states[3]) and not same_state(states[3], states[4])
    log = read_log(cfg.log_file)
    (event,) = [e for e in log.events if e.get("event") == "nonfinite"]
    assert (event["step"], event["micro_batch"], event["what"]) == (3, None, "gradients")
    assert "non-finite gradients at step 3: update skipped" in console
    assert [r["step"] for r in log.steps] == [1, 2, 4, 5]
    assert all(torch.isfinite(t).all() for t in states[5].values() if t.is_floating_point())


def _poison_every_training_loss(monkeypatch):
    """Every training micro-step's loss NaN, from the first (`inject_loss_fault` spares micro-step 0); the weights
    stay finite."""
    real = KERNELS[LOSS_OP]

    def poisoned(ins: list, attrs: dict, ctx) -> list:
        outs = list(real(ins, attrs, ctx))
        if ctx.training:
            outs[LOSS] = outs[LOSS] * math.nan
        return outs

    monkeypatch.setitem(KERNELS, LOSS_OP, poisoned)


def test_poison_from_the_first_step_fails_without_a_checkpoint(source, tmp_path, monkeypatch):
    """The guard stops a run that never applied a step: failed, and no checkpoint of the untrained state (a later
    resume would take it for progress), nothing exported."""
    _poison_every_training_loss(monkeypatch)
    cfg = train_cfg(source, tmp_path, max_steps=20, log_file=str(tmp_path / "log.jsonl"))
    result, console = train(cfg)
    assert result.steps == 3 and result.skipped == [1, 2, 3] and result.outputs == {}
    assert result.failed == f"{result.stopped}; no checkpoint was written"
    assert f"ERROR: the run failed: {result.failed}" in console
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["tokenized"]
    assert read_log(cfg.log_file).events[-1]["status"] == "failed"


def test_a_run_whose_every_step_was_skipped_fails(source, tmp_path, monkeypatch):
    """Fewer skipped steps than the guard's limit, but none applied: the run ends failed, not completed."""
    _poison_every_training_loss(monkeypatch)
    cfg = train_cfg(source, tmp_path, max_steps=2, save_steps=1, log_file=str(tmp_path / "log.jsonl"))
    result, console = train(cfg)
    assert result.stopped is None and result.skipped == [1, 2] and result.outputs == {}
    assert result.failed == ("none of the 2 step(s) of this run was applied: each had a non-finite loss or gradients "
                             "(steps 1, 2); the model is not trained; no checkpoint was written")
    assert not (tmp_path / "out" / "model").exists() and not list((tmp_path / "out").glob("checkpoint-*"))
    log = read_log(cfg.log_file)
    assert (log.events[-1]["status"], log.events[-1]["stop_reason"]) == ("failed", result.failed)
