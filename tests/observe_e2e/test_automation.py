"""early_stop and auto_lr_reduction acting on real CPU runs (thresholds as the reference fixes them)."""

from __future__ import annotations

import pytest

from surogate.runtime.checkpoint import CheckpointManager
from surogate.runtime.lr_schedule import lr_at
from surogate.runtime.observe import read_log
from tests.observe_e2e.runs import inject_grad_fault, inject_loss_fault, record_optimizer_lr, train, train_cfg


def _events(log, name):
    return [e for e in log.events if e.get("event") == name]


def test_early_stop_converged_run_stops_logs_and_checkpoints(source, tmp_path):
    # lr so small that the eval loss no longer moves: improvement < 0.15% per eval for 5 evals in a row
    # (criterion 1 with its reference thresholds) -> the 6th eval, at step 6, stops the 40-step run.
    cfg = train_cfg(source, tmp_path, max_steps=40, eval_steps=1, learning_rate=1e-7, early_stop=True,
                    log_file=str(tmp_path / "log.jsonl"))
    result, console = train(cfg)
    assert result.steps == 6 and result.stopped is not None and result.stopped.startswith("converged")
    assert len(result.eval_losses) == 6
    assert f"stopping at step 6: {result.stopped}" in console
    log = read_log(cfg.log_file)
    (stop,) = _events(log, "early_stop")
    assert stop["step"] == 6 and stop["reason"] == result.stopped
    assert [r["step"] for r in log.steps] == list(range(1, 7))
    end = log.events[-1]
    assert end["type"] == "end" and end["stop_reason"] == result.stopped and end["steps"] == 6
    assert end["status"].startswith("stopped")
    # the final checkpoint exists, is complete, and is the state at the stop
    mgr = CheckpointManager.from_config(cfg)
    latest = mgr.latest()
    assert latest is not None and latest.name.endswith("-6")
    assert mgr.load(latest).state["step"] == 6
    assert any(e.get("event") == "checkpoint" and e["step"] == 6 for e in log.events)


def test_same_run_without_early_stop_goes_on(source, tmp_path):
    """Control for the test above: the stop came from early_stop, not from the data or the schedule."""
    cfg = train_cfg(source, tmp_path, max_steps=8, eval_steps=1, learning_rate=1e-7,
                    log_file=str(tmp_path / "log.jsonl"))
    result, console = train(cfg)
    assert result.steps == 8 and result.stopped is None and "stopping at step" not in console
    assert not _events(read_log(cfg.log_file), "early_stop")


@pytest.mark.parametrize("fault, faulted, factor, reason", [
    # steps 24 and 25 report 100x their loss: a spike is 2 consecutive steps above mean + 3 sigma
    ("loss", {23, 24}, 100.0, "loss spike"),
    # step 25's gradients are 1000x: one step above 10x the average grad norm
    ("gradient", {24}, 1000.0, "gradient explosion"),
], ids=["loss-spike", "grad-explosion"])
def test_auto_lr_reduction_halves_lr(source, tmp_path, monkeypatch, fault, faulted, factor, reason):
    # micro-step index = step - 1 (accumulation 1); detection needs 20 normal steps in its window first
    inject = inject_loss_fault if fault == "loss" else inject_grad_fault
    hit = inject(monkeypatch, lambda i: factor if i in faulted else None)
    used = record_optimizer_lr(monkeypatch)
    total = 32
    cfg = train_cfg(source, tmp_path, max_steps=total, auto_lr_reduction=True, log_file=str(tmp_path / "log.jsonl"))
    result, console = train(cfg)
    assert sorted(hit) == sorted(faulted) and result.steps == total
    log = read_log(cfg.log_file)
    (red,) = _events(log, "lr_reduction")
    assert red["step"] == 25 and red["scale"] == 0.5 and red["reason"].startswith(reason)
    assert "auto_lr_reduction #1 at step 25" in console
    steps = {r["step"]: r for r in log.steps}
    if fault == "loss":
        assert steps[24]["loss"] > 50 * steps[23]["loss"]  # the spike is in the log
    else:
        assert steps[25]["grad_norm"] > 100 * steps[24]["grad_norm"]
    for s, rec in steps.items():
        scale = 0.5 if s > 25 else 1.0  # the step that triggered the reduction still ran at the full LR
        assert rec["lr"] == pytest.approx(scale * lr_at(s - 1, total, cfg), rel=1e-9), s
        assert used[s] == pytest.approx(rec["lr"], rel=1e-6), s  # what the optimizer really applied
    # and the scale is part of the saved state (a resumed run keeps it)
    mgr = CheckpointManager.from_config(cfg)
    assert mgr.load(mgr.latest()).state["lr_scale"] == 0.5


def test_auto_lr_reduction_survives_a_resume(source, tmp_path, monkeypatch):
    """A run stopped after a reduction and resumed keeps the reduced LR and the detector's history: the same
    LRs and reductions as the uninterrupted run (a fresh detector would need 20 new steps before it could see
    the second explosion, and the restored 0.5 would have been undone after one step)."""
    faults = {24: 1000.0, 47: 1000.0}  # gradient explosions at steps 25 and 48 (after the 20-step cooldown)
    hit = inject_grad_fault(monkeypatch, faults.get)
    used = record_optimizer_lr(monkeypatch)
    common = dict(auto_lr_reduction=True, lr_scheduler_type="wsd", warmup_steps=0, save_steps=30)
    whole = train_cfg(source, tmp_path / "whole", max_steps=50, log_file=str(tmp_path / "whole.jsonl"), **common)
    train(whole)
    lr_whole = dict(used)
    assert sorted(hit) == [24, 47]
    reductions = [(e["step"], e["scale"]) for e in _events(read_log(whole.log_file), "lr_reduction")]
    assert reductions == [(25, 0.5), (48, 0.25)]

    hit.clear()
    used.clear()
    first = train_cfg(source, tmp_path / "split", max_steps=30, log_file=str(tmp_path / "first.jsonl"), **common)
    train(first)
    resumed = train_cfg(source, tmp_path / "split", max_steps=50, resume_from_checkpoint=True,
                        log_file=str(tmp_path / "resumed.jsonl"), **common)
    result, _ = train(resumed)
    assert result.steps == 50 and sorted(hit) == [24, 47]
    assert [(e["step"], e["scale"]) for e in _events(read_log(resumed.log_file), "lr_reduction")] == [(48, 0.25)]
    assert used == pytest.approx(lr_whole, rel=1e-12)
    assert {s: lr for s, lr in used.items() if s > 30} == pytest.approx(
        {s: (0.5 if s <= 48 else 0.25) * 1e-3 for s in range(31, 51)}, rel=1e-9)
