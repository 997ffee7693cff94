"""TrainingObserver end to end without a training loop: JSONL log, console (non-terminal), plot, decisions."""

from __future__ import annotations

import io
import json
import math
import re

import pytest

from surogate.runtime.observe import EndSummary, EvalMetrics, StepMetrics, TrainingObserver, read_log
from tests.observe.conftest import make_cfg, make_info


def feed(obs, steps, loss=lambda s: 3.0 - 0.05 * s, start=1):
    decisions = []
    for s in range(start, start + steps):
        decisions.append(obs.on_step(StepMetrics(step=s, loss=loss(s), lr=2e-4, grad_norm=1.0, tokens=1000,
                                                 epoch=s / 20, step_time=0.5)))
    return decisions


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_log_console_and_plot(observer_factory, tmp_path):
    log = tmp_path / "logs" / "train.jsonl"
    obs, out = observer_factory({"log_file": str(log)})
    assert re.fullmatch(r"Qwen3-0\.6B-\d{8}-\d{6}", obs.run_name)
    obs.on_start()
    feed(obs, 10)
    obs.on_eval(EvalMetrics(step=10, loss=2.6))
    # flushed per line: a run killed now keeps everything so far
    assert [r["type"] for r in records(log)] == ["start"] + ["step"] * 10 + ["eval"]
    obs.on_checkpoint(tmp_path / "out" / "checkpoint-10", step=10)
    assert obs.plot_path.is_file()
    feed(obs, 10, start=11)
    obs.on_eval(EvalMetrics(step=20, loss=2.2, extra={"accuracy": 0.5}))
    outputs = obs.on_end(EndSummary(outputs={"adapter": tmp_path / "out" / "adapter"}))

    recs = records(log)
    start, end = recs[0], recs[-1]
    assert start["run_name"] == obs.run_name and start["config"]["model"] == "Qwen/Qwen3-0.6B"
    assert start["run_info"]["total_params"] == 1_000_000
    steps = [r for r in recs if r["type"] == "step"]
    assert [r["step"] for r in steps] == list(range(1, 21))
    assert steps[0]["loss"] == pytest.approx(2.95) and steps[0]["tokens_per_s"] == pytest.approx(2000.0)
    assert steps[0]["phase"] == "WARMUP" and steps[0]["lr_scale"] == 1.0
    evals = [r for r in recs if r["type"] == "eval"]
    assert evals[1] == {**evals[1], "step": 20, "loss": 2.2, "accuracy": 0.5,
                        "perplexity": pytest.approx(math.exp(2.2))}
    assert any(r.get("event") == "checkpoint" and r["path"].endswith("checkpoint-10") for r in recs)
    assert end["type"] == "end" and end["status"] == "completed" and end["steps"] == 20
    assert end["tokens"] == 20_000 and end["final_eval_loss"] == 2.2
    assert outputs["loss_plot"] == str(obs.plot_path) and outputs["log_file"] == str(log)
    assert outputs["adapter"].endswith("adapter")

    text = out.getvalue()
    assert "\x1b[" not in text  # plain text when not a terminal
    for expected in (f"Surogate run {obs.run_name}", "parameters: 1M total, 10K trainable (1%)",
                     "data: 100 rows, 20K tokens, packing efficiency 93.0%", "plan: peak memory 3.00 GiB on cpu",
                     "Chinchilla budget: 20 x 1M params = 20M tokens; planned 20K tokens (0.1% of budget)",
                     "eval at step 10: loss 2.6000", "final train loss 2.0000, final eval loss 2.2000",
                     "tokens: 20K", f"loss_plot: {obs.plot_path}"):
        assert expected in text, expected
    step_lines = [ln for ln in text.splitlines() if ln.startswith("step ")]
    assert step_lines[0] == ("step 1/20 | epoch 0.05 | loss 2.9500 | lr 2.00e-04 | gnorm 1.000 | 2.0k tok/s | "
                             "00:00 elapsed, ETA 00:10 | WARMUP")
    assert "eval 2.6000" in step_lines[-1] and step_lines[-1].startswith("step 20/20")
    # read back the same series the plot command uses
    data = read_log(log)
    assert len(data.steps) == 20 and [e["step"] for e in data.evals] == [10, 20]


def test_plain_mode_prints_about_100_lines(tmp_path):
    out = io.StringIO()
    obs = TrainingObserver(make_cfg(output_dir=str(tmp_path)), None, make_info(total_steps=1000),
                           console_file=out, force_terminal=False)
    obs.on_start()
    feed(obs, 1000, loss=lambda s: 2.0)
    printed = [ln.split(" |")[0] for ln in out.getvalue().splitlines() if ln.startswith("step ")]
    assert len(printed) == 101 and printed[0] == "step 1/1000" and printed[-1] == "step 1000/1000"
    assert "phase WARMUP -> PLATEAU at step 100" in out.getvalue()  # window = 1000 // 10
    obs.on_end()


def test_terminal_mode_progress_bar(tmp_path):
    out = io.StringIO()
    obs = TrainingObserver(make_cfg(output_dir=str(tmp_path)), None, make_info(), console_file=out,
                           force_terminal=True)
    obs.on_start()
    feed(obs, 3)
    obs.on_end()
    text = out.getvalue()
    assert "\x1b[" in text and "step 3/20" in text and "Surogate run" in text


def test_auto_lr_reduction_decision_and_event(observer_factory, tmp_path):
    log = tmp_path / "l.jsonl"
    obs, out = observer_factory({"auto_lr_reduction": True, "log_file": str(log)}, {"total_steps": 200})
    obs.on_start()
    decisions = feed(obs, 120, loss=lambda s: 6.0 if s in (100, 101) else 2.0 + 0.01 * (-1) ** s)
    assert [d.lr_scale for d in decisions[98:102]] == [1.0, 1.0, 0.5, 0.5]
    assert not any(d.stop or d.skip_step for d in decisions)
    ev = [r for r in records(log) if r.get("event") == "lr_reduction"]
    assert len(ev) == 1 and ev[0]["step"] == 101 and ev[0]["scale"] == 0.5
    assert "auto_lr_reduction #1 at step 101: loss spike: 2 steps above mean" in out.getvalue()
    step101 = next(r for r in records(log) if r["type"] == "step" and r["step"] == 101)
    assert step101["lr_scale"] == 0.5


def test_lr_reduction_off_by_default(observer_factory):
    obs, _ = observer_factory(None, {"total_steps": 200})
    obs.on_start()
    decisions = feed(obs, 120, loss=lambda s: 6.0 if s in (100, 101) else 2.0 + 0.01 * (-1) ** s)
    assert all(d.lr_scale == 1.0 for d in decisions)


def test_early_stop_plateau_through_observer(observer_factory, tmp_path):
    log = tmp_path / "l.jsonl"
    obs, out = observer_factory({"early_stop": True, "log_file": str(log)}, {"total_steps": 1000})
    obs.on_start()
    decisions = feed(obs, 610, loss=lambda s: 2.0)
    first = next(i for i, d in enumerate(decisions, 1) if d.stop)
    d = decisions[first - 1]
    assert first == 599  # phase window 100: PLATEAU from step 100, 500th PLATEAU step is 599
    assert d.save_checkpoint and d.stop_reason.startswith("plateau")
    obs.on_end()
    recs = records(log)
    assert [r["step"] for r in recs if r.get("event") == "early_stop"] == [599]
    assert recs[-1]["status"] == "stopped early" and recs[-1]["stop_reason"].startswith("plateau")
    assert "stopping at step 599: plateau" in out.getvalue()
    assert "plateau at step 200" in out.getvalue()  # the always-on warning came long before


def test_early_stop_off_never_stops(observer_factory):
    obs, _ = observer_factory(None, {"total_steps": 1000})
    obs.on_start()
    assert not any(d.stop for d in feed(obs, 600, loss=lambda s: 2.0))


def test_nonfinite_skip_then_stop(observer_factory, tmp_path):
    log = tmp_path / "l.jsonl"
    obs, out = observer_factory({"log_file": str(log)})
    obs.on_start()
    feed(obs, 2)
    d1 = obs.on_step(StepMetrics(step=3, loss=float("nan"), lr=1e-4))
    assert d1.skip_step and not d1.stop
    d2 = obs.on_nonfinite(4, micro_batch=3, what="gradients")
    d3 = obs.on_step(StepMetrics(step=5, loss=1.0, lr=1e-4, grad_norm=float("inf")))
    assert d2.skip_step and not d2.stop
    assert d3.skip_step and d3.stop and d3.save_checkpoint and "3 consecutive" in d3.stop_reason
    ev = [r for r in records(log) if r.get("event") == "nonfinite"]
    assert [(r["step"], r["micro_batch"], r["what"]) for r in ev] == [(3, None, "loss"), (4, 3, "gradients"),
                                                                      (5, None, "gradients")]
    assert [r["step"] for r in records(log) if r["type"] == "step"] == [1, 2]  # skipped steps are not steps
    assert "non-finite gradients at step 4, micro-batch 3: update skipped" in out.getvalue()


def test_memory_breakdown(observer_factory):
    obs, out = observer_factory({"debug_memory_breakdown": True})
    obs.on_start()
    obs.on_allocated({"weights": 2**30, "activations": 2**29})
    text = out.getvalue()
    assert "memory breakdown (plan):" in text and re.search(r"weights\s+1\.000 GiB", text)
    assert re.search(r"total\s+1\.500 GiB", text) and "host_rss" in text
    quiet, qout = observer_factory()
    quiet.on_allocated({"weights": 1})
    assert "memory breakdown" not in qout.getvalue()


def test_time_breakdown_every_log_gpu_util_steps(observer_factory, tmp_path):
    log = tmp_path / "l.jsonl"
    obs, out = observer_factory({"debug_time_breakdown": True, "log_gpu_util": 5, "log_file": str(log)})
    obs.on_start()
    for s in range(1, 11):
        obs.timer.add("forward", 0.100)
        obs.timer.add("backward", 0.300)
        obs.timer.add("my_phase", 0.025)
        with obs.timer.phase("optimizer"):
            pass
        feed(obs, 1, start=s)  # step_time 0.5 s: 75 ms per step not covered by any phase
    reports = [r for r in records(log) if r.get("event") == "time_breakdown"]
    assert [r["step"] for r in reports] == [5, 10]
    phases = reports[1]["phases"]
    assert list(phases) == ["forward", "backward", "optimizer", "my_phase", "other"]
    assert phases["forward"]["ms_per_step"] == pytest.approx(100.0) and phases["forward"]["share"] == pytest.approx(0.2)
    assert phases["other"]["ms_per_step"] == pytest.approx(75.0, abs=0.1)
    assert "time breakdown over 5 steps: forward 100.0ms (20%), backward 300.0ms (60%), optimizer 0.0ms (0%), " \
        "my_phase 25.0ms (5%), other 75.0ms (15%)" in out.getvalue()


def test_phase_timer_without_wall_time():
    from surogate.runtime.observe.timing import PhaseTimer

    t = PhaseTimer()
    t.add("data", 1.0)
    t.add("forward", 3.0)
    t.step_done()
    t.step_done()
    rep = t.report()
    assert rep == {"steps": 2, "phases": {"data": {"ms_per_step": 500.0, "share": 0.25},
                                          "forward": {"ms_per_step": 1500.0, "share": 0.75}}}
    assert t.report()["phases"] == {}  # reset after each report
    off = PhaseTimer(enabled=False)
    with off.phase("data"):
        pass
    off.add("forward", 1.0)
    assert off.totals == {}


def test_gpu_util_absent_on_cpu(observer_factory, tmp_path):
    log = tmp_path / "l.jsonl"
    obs, _ = observer_factory({"log_gpu_util": 1, "log_file": str(log)})
    obs.on_start()
    feed(obs, 3)
    assert not any(k.startswith("gpu_") for r in records(log) for k in r)


def test_non_main_rank_writes_nothing_but_decides(tmp_path):
    out = io.StringIO()
    cfg = make_cfg(output_dir=str(tmp_path / "o"), log_file=str(tmp_path / "l.jsonl"), early_stop=True)
    obs = TrainingObserver(cfg, None, make_info(total_steps=1000), is_main=False, console_file=out,
                           force_terminal=False)
    obs.on_start()
    stops = [i for i, d in enumerate(feed(obs, 610, loss=lambda s: 2.0), 1) if d.stop]
    obs.on_end()
    assert stops[0] == 599
    assert out.getvalue() == "" and not (tmp_path / "l.jsonl").exists() and not (tmp_path / "o").exists()


def test_context_manager_records_failure(tmp_path):
    log = tmp_path / "l.jsonl"
    cfg = make_cfg(output_dir=str(tmp_path), log_file=str(log), run_name="my-run")
    with pytest.raises(RuntimeError):
        with TrainingObserver(cfg, tmp_path, make_info(), console_file=io.StringIO(), force_terminal=False) as obs:
            feed(obs, 2)
            raise RuntimeError("boom")
    recs = records(log)
    assert recs[0]["run_name"] == "my-run" and recs[-1]["type"] == "end" and recs[-1]["status"] == "failed"


def test_gpu_samples_logged_every_n_steps(observer_factory, tmp_path, monkeypatch):
    fake = {"torch_allocated_gb": 10.0, "torch_reserved_gb": 12.0, "gpu_util": 97.0, "gpu_mem_used_gb": 61.25,
            "gpu_mem_total_gb": 80.0, "gpu_power_w": 640.0}
    calls = []
    monkeypatch.setattr("surogate.runtime.observe.observer.sample_gpu", lambda: calls.append(1) or dict(fake))
    log = tmp_path / "l.jsonl"
    obs, out = observer_factory({"log_gpu_util": 4, "log_file": str(log)})
    obs.on_start()
    feed(obs, 9)
    sampled = {r["step"]: r for r in records(log) if r["type"] == "step" and "gpu_util" in r}
    assert list(sampled) == [4, 8] and len(calls) == 2
    assert sampled[8]["gpu_power_w"] == 640.0 and sampled[8]["gpu_mem_used_gb"] == 61.25
    assert "gpu at step 4: util 97%, memory 61.2/80.0 GiB (torch 10.0 allocated), power 640 W" in out.getvalue()


class BrokenTracker:
    name = "wandb"
    location = None

    def log_metrics(self, metrics, step):
        raise ConnectionError("network down")

    def finish(self, summary, status="completed"):
        raise AssertionError("a dropped tracker is not finished")


def test_failing_tracker_is_dropped_not_fatal(observer_factory, tmp_path):
    log = tmp_path / "l.jsonl"
    obs, out = observer_factory({"log_file": str(log)})
    obs.on_start()
    obs.trackers.append(BrokenTracker())
    decisions = feed(obs, 3)
    assert not any(d.stop for d in decisions) and obs.trackers == []
    assert "wandb: logging failed at step 1 (ConnectionError('network down'))" in out.getvalue()
    assert [r["step"] for r in records(log) if r["type"] == "step"] == [1, 2, 3]
    assert [r["event"] for r in records(log) if r.get("event") == "tracker_error"] == ["tracker_error"]


def test_phase_window_scales_with_run_length():
    from surogate.runtime.observe.diagnostics import phase_window

    assert [phase_window(n) for n in (10, 60, 500, 1000, 100_000)] == [20, 20, 50, 100, 100]


def test_accepts_numpy_and_tensor_scalars(observer_factory, tmp_path):
    import numpy as np
    import torch

    log = tmp_path / "l.jsonl"
    obs, _ = observer_factory({"log_file": str(log)})
    obs.on_start()
    obs.on_step(StepMetrics(step=np.int64(1), loss=torch.tensor(2.5), lr=np.float32(1e-4),
                            grad_norm=torch.tensor(0.75), tokens=torch.tensor(64), extra={"aux": np.float32(0.5)}))
    obs.on_eval(EvalMetrics(step=1, loss=np.float64(2.25), extra={"acc": torch.tensor(0.5)}))
    step, ev = [r for r in records(log) if r["type"] in ("step", "eval")]
    assert (step["loss"], step["grad_norm"], step["tokens"], step["aux"]) == (2.5, 0.75, 64, 0.5)
    assert step["lr"] == pytest.approx(1e-4) and ev["loss"] == 2.25 and ev["acc"] == 0.5


def test_plot_failure_is_a_warning(observer_factory, tmp_path):
    obs, out = observer_factory()
    obs.on_start()
    feed(obs, 3)
    obs.plot_path = tmp_path / "blocker" / "training_loss.png"
    (tmp_path / "blocker").write_text("a file where the folder should be")
    obs.on_checkpoint(tmp_path / "ckpt", step=3)
    outputs = obs.on_end()
    assert "loss_plot" not in outputs and "WARNING: could not write" in out.getvalue()


def test_detectors_continue_from_a_checkpoint_as_if_never_stopped(observer_factory):
    """state() -> JSON (as a checkpoint stores it) -> restore(): phase, plateau, early-stop and LR-reduction
    decisions of the resumed observer equal the uninterrupted one's, step for step."""
    total, cut = 400, 230
    info = {"total_steps": total, "total_params": 1_000}
    cfg = {"early_stop": True, "auto_lr_reduction": True}

    def loss(s):  # learning, a spike at 150, then a long plateau with noise (the detectors all have work)
        base = 3.0 - 0.004 * min(s, 250) + 0.01 * math.sin(s * 1.7)
        return base * (40.0 if s in (150, 151) else 1.0)

    def run(obs, steps):
        out = []
        for s in steps:
            d = obs.on_step(StepMetrics(step=s, loss=loss(s), lr=2e-4, grad_norm=1.0, tokens=1000, epoch=s / 50,
                                        step_time=0.5))
            if s % 25 == 0:
                e = obs.on_eval(EvalMetrics(step=s, loss=loss(s) + 0.1))
                d = e if e.stop else d
            out.append((s, obs.phase.phase, obs.plateau.on_plateau, d.lr_scale, d.stop))
            if d.stop:
                break
        return out

    whole, _ = observer_factory(cfg, info)
    expected = run(whole, range(1, total + 1))
    first, _ = observer_factory(cfg, info)
    head = run(first, range(1, cut + 1))
    resumed, _ = observer_factory(cfg, info)
    resumed.restore(json.loads(json.dumps(first.state())))
    tail = run(resumed, range(cut + 1, total + 1))
    assert head + tail == expected
    assert any(r[3] < 1.0 for r in expected) and len({r[1] for r in expected}) > 1  # decisions happened
    fresh, _ = observer_factory(cfg, info)  # without the state the tail differs (the test can fail)
    assert run(fresh, range(cut + 1, total + 1)) != tail


@pytest.mark.parametrize("warmup, total, said", [(100, 20, True), (20, 20, True), (19, 20, False), (0, 20, False)])
def test_start_summary_says_when_warmup_is_not_shorter_than_the_run(warmup, total, said):
    """max_steps derived from the data: validate cannot compare warmup_steps with it; the start summary does."""
    from surogate.runtime.observe.summary import start_lines

    lines = start_lines("r", make_info(warmup_steps=warmup, total_steps=total), "out", None, [])
    notes = [ln for ln in lines if "never reaches learning_rate" in ln]
    assert bool(notes) == said, lines
    if said:
        assert f"warmup ({warmup} steps)" in notes[0] and f"the run ({total} steps)" in notes[0]


def test_start_summary_share_of_adapters_larger_than_the_model():
    from surogate.runtime.observe.summary import start_lines

    small = start_lines("r", make_info(trainable_params=10_000), "out", None, [])
    assert any("trainable (1%)" in ln for ln in small), small
    big = start_lines("r", make_info(trainable_params=16_500_000), "out", None, [])
    assert any("trainable (1,650% of the model: adapters larger than it)" in ln for ln in big), big


def test_fresh_run_onto_an_earlier_log_says_so_and_the_reader_keeps_the_new_run(observer_factory, tmp_path):
    """A fresh run whose log_file holds an earlier run's steps appends after them (nothing is lost) with a
    warning, and the reader (plot, resume) takes the new run's records from its start on: the earlier run's
    steps 4..12 do not reappear beside a new run that stopped at step 3."""
    log = tmp_path / "train.jsonl"
    first, _ = observer_factory({"log_file": str(log), "run_name": "first"})
    first.on_start()
    feed(first, 12, loss=lambda s: 9.0)
    first.on_end()
    second, out = observer_factory({"log_file": str(log), "run_name": "second"})
    second.on_start()
    feed(second, 3, loss=lambda s: 1.0)
    second.on_end()

    recs = records(log)
    assert sum(r["type"] == "step" for r in recs) == 15  # every line kept
    (warn,) = [r for r in recs if r.get("event") == "log_superseded"]
    assert warn["records"] == 12 and "steps 1-12" in warn["message"]
    assert "already holds 12 step record(s) of an earlier run" in out.getvalue()
    data = read_log(log)
    assert [(r["step"], r["loss"]) for r in data.steps] == [(1, 1.0), (2, 1.0), (3, 1.0)]
    assert data.superseded == 12


def test_resume_going_back_over_logged_steps_supersedes_them(observer_factory, tmp_path):
    """The earlier run logged steps 1..9 but checkpointed at 5: the resumed run (first_step 5) says that steps
    6..9 are replaced, and a reader after it stopped at step 7 sees 1..5 of the first run and 6..7 of the
    second, not the first run's 8 and 9."""
    log = tmp_path / "train.jsonl"
    first, _ = observer_factory({"log_file": str(log)})
    first.on_start()
    feed(first, 9, loss=lambda s: 9.0)
    first.on_end()
    resumed, out = observer_factory({"log_file": str(log)}, {"start_step": 5})
    resumed.on_start()
    feed(resumed, 2, loss=lambda s: 1.0, start=6)
    resumed.on_end()
    assert "4 step record(s) past the resumed step 5 (steps 6-9)" in out.getvalue()
    data = read_log(log)
    assert [(r["step"], r["loss"]) for r in data.steps] == [(s, 9.0) for s in range(1, 6)] + [(6, 1.0), (7, 1.0)]


def test_reader_without_first_step_keeps_the_latest_record_per_step(tmp_path):
    """Logs written before `first_step` existed read as before: the later record per step wins, nothing is
    superseded."""
    log = tmp_path / "old.jsonl"
    lines = [{"type": "start", "run_name": "a"}] + [{"type": "step", "step": s, "loss": 2.0} for s in (1, 2, 3)]
    lines += [{"type": "start", "run_name": "b"}, {"type": "step", "step": 1, "loss": 1.0}]
    log.write_text("".join(json.dumps(r) + "\n" for r in lines))
    data = read_log(log)
    assert [(r["step"], r["loss"]) for r in data.steps] == [(1, 1.0), (2, 2.0), (3, 2.0)]
    assert data.superseded == 0
