"""The documented loop contract, followed by a tiny real torch training loop (linear regression, SGD)."""

from __future__ import annotations

import io
import json
import math

import torch

from surogate.runtime.observe import EndSummary, EvalMetrics, RunInfo, StepMetrics, TrainingObserver
from tests.observe.conftest import make_cfg

BASE_LR = 0.05


def train(cfg, out_dir, steps=200, nan_steps=(), corrupt_steps=()):
    """A minimal loop making exactly the calls listed in surogate.runtime.observe's docstring."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    opt = torch.optim.SGD(model.parameters(), lr=BASE_LR)
    w_true = torch.randn(8, 1)
    info = RunInfo(model="tiny-linear", total_params=9, trainable_params=9, total_steps=steps, tokens_per_step=16)
    obs = TrainingObserver(cfg, out_dir, info, console_file=io.StringIO(), force_terminal=False)
    lr_scale, lrs, saved = 1.0, {}, None
    with obs:
        for step in range(1, steps + 1):
            x = torch.randn(16, 8)
            y = x @ w_true + 0.01 * torch.randn(16, 1)
            if step in corrupt_steps:
                y = y * 100.0  # a batch of garbage labels: a loss spike
            loss = torch.nn.functional.mse_loss(model(x), y)
            if step in nan_steps:
                loss = loss * float("nan")
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
            if not (math.isfinite(loss.item()) and math.isfinite(grad_norm.item())):
                d = obs.on_nonfinite(step, 0, "loss")
            else:
                for g in opt.param_groups:
                    g["lr"] = BASE_LR * lr_scale
                lrs[step] = opt.param_groups[0]["lr"]
                opt.step()
                d = obs.on_step(StepMetrics(step, loss.item(), lrs[step], grad_norm.item(), tokens=16))
            opt.zero_grad()
            lr_scale = d.lr_scale
            if step % 50 == 0:
                obs.on_eval(EvalMetrics(step, loss.item()))
            if d.stop:
                if d.save_checkpoint:
                    saved = {k: v.clone() for k, v in model.state_dict().items()}
                break
        obs.on_end(EndSummary(outputs={"model": str(out_dir / "model")}))
    return model, obs, lrs, saved, step


def log_records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_nan_steps_are_skipped_then_stop_keeps_last_good_state(tmp_path):
    log = tmp_path / "log.jsonl"
    cfg = make_cfg(output_dir=str(tmp_path), log_file=str(log))
    model, obs, _, saved, last = train(cfg, tmp_path, nan_steps={30, 60, 61, 62})
    assert last == 62 and saved is not None  # isolated NaN at 30 tolerated; 3 in a row stop at 62
    assert all(torch.isfinite(v).all() for v in saved.values())
    recs = log_records(log)
    assert [r["step"] for r in recs if r.get("event") == "nonfinite"] == [30, 60, 61, 62]
    assert recs[-1]["status"] == "stopped early" and "3 consecutive" in recs[-1]["stop_reason"]
    assert 30 not in [r["step"] for r in recs if r["type"] == "step"]


def test_loss_spike_halves_the_optimizer_lr(tmp_path):
    log = tmp_path / "log.jsonl"
    cfg = make_cfg(output_dir=str(tmp_path), log_file=str(log), auto_lr_reduction=True)
    model, obs, lrs, saved, last = train(cfg, tmp_path, corrupt_steps={120, 121})
    assert last == 200 and saved is None
    # the first garbage batch already explodes the gradient norm (single-step rule); 121 is in cooldown
    assert lrs[120] == BASE_LR and lrs[121] == BASE_LR / 2 and lrs[200] == BASE_LR / 2
    recs = log_records(log)
    reductions = [r for r in recs if r.get("event") == "lr_reduction"]
    assert [(r["step"], r["scale"]) for r in reductions] == [(120, 0.5)]
    assert reductions[0]["reason"].startswith("gradient explosion")
    assert recs[-1]["status"] == "completed" and recs[-1]["steps"] == 200
    assert (tmp_path / "training_loss.png").is_file()
