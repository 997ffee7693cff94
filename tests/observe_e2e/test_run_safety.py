"""Real `run_training` runs (cpu backend) that must never lose or mix a run's work:

- F2: a run that does not resume refuses, before training, a folder holding another run's checkpoints;
- F9: a `checkpoint_dir` that is a file is refused before training (it used to fail at the first save);
- F17a: a checkpoint found corrupt at resume is reported, and rotation keeps the good ones;
- F6: SIGTERM / SIGINT stop after the current step with a checkpoint and the log's end record; resuming from
  it continues the run exactly;
- F4: rows the data pipeline deleted are in the start summary and the log's start record;
- a run that starts fresh refuses, before training, an output_dir holding an earlier run's exported model (it
  would replace it at its end), and every way a refusal advises to proceed works.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess

import pytest

from surogate.errors import UserError
from surogate.runtime.checkpoint import TENSORS_FILE
from surogate.runtime.observe.jsonl import read_log
from surogate.runtime.trainer import Trainer
from tests.observe_e2e.runs import train, train_cfg
from tests.runtime.helpers import write_text_data


def _cfg(source, tmp_path, **over):
    base = dict(max_steps=8, save_steps=2, save_total_limit=2, log_file=str(tmp_path / "out" / "log.jsonl"))
    return train_cfg(source, tmp_path, **{**base, **over})


def _folders(tmp_path):
    return sorted((p.name for p in (tmp_path / "out").glob("checkpoint-*")), key=lambda n: int(n.split("-")[1]))


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if any optimizer step runs."""
    def refuse(self):
        raise AssertionError("a step ran before the problem was reported")

    monkeypatch.setattr(Trainer, "train_step", refuse)


def test_fresh_run_refuses_a_folder_with_another_runs_checkpoints(source, tmp_path, monkeypatch):
    train(_cfg(source, tmp_path))
    assert _folders(tmp_path) == ["checkpoint-6", "checkpoint-8"]
    monkeypatch.setattr(Trainer, "train_step", lambda self: pytest.fail("trained before refusing"))
    with pytest.raises(UserError) as err:
        train(_cfg(source, tmp_path, max_steps=4, resume_from_checkpoint=False))
    msg = str(err.value)
    assert msg.startswith(f"output_dir: {tmp_path / 'out'} already holds checkpoints") and "checkpoint-6, checkpoint-8" in msg
    assert "resume_from_checkpoint: true" in msg and "give it another output_dir" in msg
    assert f"remove the earlier run's checkpoints and exported models (rm -r {tmp_path / 'out'}/checkpoint-* " in msg
    assert _folders(tmp_path) == ["checkpoint-6", "checkpoint-8"]  # nothing deleted


def test_checkpoint_dir_that_is_a_file_is_refused_before_training(source, tmp_path, no_training):
    target = tmp_path / "ckpt-file"
    target.write_text("")
    with pytest.raises(UserError, match=rf"^checkpoint_dir: {target} cannot hold checkpoints: {target} is a file"):
        train(_cfg(source, tmp_path, checkpoint_dir=str(target)))


def test_resume_reports_a_corrupt_checkpoint_and_rotation_keeps_the_good_ones(source, tmp_path):
    train(_cfg(source, tmp_path, max_steps=4))
    newest = tmp_path / "out" / "checkpoint-4"
    data = bytearray((newest / TENSORS_FILE).read_bytes())
    data[-1] ^= 0xFF  # same size, wrong sha256
    (newest / TENSORS_FILE).write_bytes(bytes(data))
    result, console = train(_cfg(source, tmp_path, max_steps=9, save_steps=3))
    assert result.steps == 9
    assert "resume: skipped checkpoint-4" in console and "resumed from checkpoint-2" in console
    start = [e for e in read_log(tmp_path / "out" / "log.jsonl").events if e["type"] == "start"][-1]
    assert any("skipped checkpoint-4" in n for n in start["run_info"]["notes"])
    # saves 3, 6, 9 (limit 2): the good ones rotate; the corrupt 4 is neither counted nor kept in their place
    assert _folders(tmp_path) == ["checkpoint-4", "checkpoint-6", "checkpoint-9"]


def test_resume_with_only_corrupt_checkpoints_is_refused(source, tmp_path, monkeypatch):
    train(_cfg(source, tmp_path, max_steps=2))
    (tmp_path / "out" / "checkpoint-2" / TENSORS_FILE).write_bytes(b"junk")
    monkeypatch.setattr(Trainer, "train_step", lambda self: pytest.fail("started afresh beside them"))
    with pytest.raises(UserError, match=r"resume_from_checkpoint is true but none of the 1 checkpoint\(s\)"):
        train(_cfg(source, tmp_path, max_steps=4))


def _signal_at(monkeypatch, step: int, signum: int) -> None:
    """Send this process `signum` (as `kill` would) right after optimizer step `step`."""
    real = Trainer.train_step

    def train_step(self):
        out = real(self)
        if self.step == step:
            os.kill(os.getpid(), signum)
        return out

    monkeypatch.setattr(Trainer, "train_step", train_step)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_a_checkpoint_and_the_resumed_run_continues_exactly(source, tmp_path, monkeypatch, signum):
    over = dict(max_steps=8, save_steps=100, lr_scheduler_type="cosine", warmup_steps=2)
    straight, _ = train(_cfg(source, tmp_path / "straight", **over))

    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}  # whatever the process had
    with monkeypatch.context() as patch:
        _signal_at(patch, 3, signum)
        stopped, console = train(_cfg(source, tmp_path, **over))
    assert stopped.signal == signum and stopped.steps == 3
    name = signal.Signals(signum).name
    assert stopped.stopped == f"{name} received" and set(stopped.outputs) == {"checkpoint"}
    assert _folders(tmp_path) == ["checkpoint-3"] and not (tmp_path / "out" / "model").exists()
    assert f"{name} received" in console
    end = [e for e in read_log(tmp_path / "out" / "log.jsonl").events if e["type"] == "end"][-1]
    assert end["status"] == "interrupted" and end["stop_reason"] == f"{name} received" and end["steps"] == 3
    assert {s: signal.getsignal(s) for s in handlers} == handlers  # the run put the process's handlers back

    resumed, console = train(_cfg(source, tmp_path, **over))
    assert "resuming at step 3" in console and resumed.signal is None and resumed.steps == 8
    assert stopped.losses + resumed.losses == straight.losses
    assert (tmp_path / "out" / "model").is_dir()


@pytest.mark.parametrize("strategy, note", [
    (None, "data: 1 row truncated on the right to max_length 64"),  # text: sequence_len's rule, not deleted
    ("split", "data: 1 row split into pieces of max_length 64")])
def test_long_text_rows_are_reported_in_the_start_summary_and_log(source, tmp_path, strategy, note):
    data = write_text_data(tmp_path / "data.jsonl", rows=32)
    with open(data, "a", encoding="utf-8") as f:  # one row far longer than sequence_len 64
        f.write(json.dumps({"text": " ".join(f"w{i % 92}" for i in range(300))}) + "\n")
    over = {"truncation_strategy": strategy} if strategy else {}
    _, console = train(_cfg((source[0], data), tmp_path, max_steps=1, **over))
    assert note in console and "deleted" not in console
    start = [e for e in read_log(tmp_path / "out" / "log.jsonl").events if e["type"] == "start"][-1]
    assert note in start["run_info"]["notes"]


def test_rerunning_a_finished_run_trains_nothing_and_rewrites_no_checkpoint(source, tmp_path):
    first, _ = train(_cfg(source, tmp_path, max_steps=3, save_steps=100))
    (ckpt,) = [p for p in (tmp_path / "out").iterdir() if p.name.startswith("checkpoint-")]
    stamp = (ckpt / TENSORS_FILE).stat().st_mtime_ns
    again, console = train(_cfg(source, tmp_path, max_steps=3, save_steps=100))
    assert again.steps == first.steps == 3 and again.losses == []
    assert "checkpoint-3 already completes the run (3 steps): nothing to train" in console
    assert (ckpt / TENSORS_FILE).stat().st_mtime_ns == stamp and _folders(tmp_path) == ["checkpoint-3"]


def _digest(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _rm_advised(message):
    """Run the `rm -r ...` a refusal advises (as a user pastes it into a shell)."""
    (command,) = re.findall(r"\((rm -r [^)]*)\)", message)
    subprocess.run(["bash", "-c", command], check=True)


def test_a_refused_resume_advises_only_what_works(source, tmp_path, monkeypatch):
    """A resume refused for a changed option names it and the ways on: another output_dir, or removing the earlier
    run's checkpoints and model; not `resume_from_checkpoint: false` (refused too) nor another checkpoint_dir alone
    (the model in output_dir would be replaced at the end). Each way it names is taken here and works."""
    train(_cfg(source, tmp_path, max_steps=2))
    model = tmp_path / "out" / "model"
    kept = _digest(model)
    with pytest.raises(UserError) as err:
        train(_cfg(source, tmp_path, max_steps=2, learning_rate=5e-4))
    msg = str(err.value)
    assert "cannot resume. Differences: learning_rate: 0.001 -> 0.0005. To resume it, put those options back" in msg
    assert "give it another output_dir, or remove the earlier run's checkpoints and exported models" in msg
    assert "resume_from_checkpoint: false" not in msg and "checkpoint_dir" not in msg
    # what the message no longer advises is refused before training, and loses nothing
    monkeypatch.setattr(Trainer, "train_step", lambda self: pytest.fail("trained before refusing"))
    with pytest.raises(UserError, match="already holds checkpoints of an earlier run"):
        train(_cfg(source, tmp_path, max_steps=2, learning_rate=5e-4, resume_from_checkpoint=False))
    with pytest.raises(UserError) as err2:
        train(_cfg(source, tmp_path, max_steps=2, learning_rate=5e-4, checkpoint_dir=str(tmp_path / "elsewhere")))
    elsewhere = str(err2.value)
    assert elsewhere.startswith(f"output_dir: {tmp_path / 'out'} already holds model/ exported by an earlier run, and "
                                f"this run starts fresh (there is no checkpoint in {tmp_path / 'elsewhere'} to resume)")
    assert f"remove the earlier run's exported models (rm -r {model})" in elsewhere
    assert _digest(model) == kept
    monkeypatch.undo()
    # way 1: another output_dir
    other, _ = train(_cfg(source, tmp_path, max_steps=2, learning_rate=5e-4, output_dir=str(tmp_path / "other"),
                          log_file=str(tmp_path / "other" / "log.jsonl")))
    assert other.failed is None and (tmp_path / "other" / "model").is_dir() and _digest(model) == kept
    # way 2: remove what the message names, then the same command
    _rm_advised(msg)
    assert not model.exists() and not _folders(tmp_path)
    fresh, _ = train(_cfg(source, tmp_path, max_steps=2, learning_rate=5e-4))
    assert fresh.first_step == 0 and fresh.steps == 2 and model.is_dir()


def test_a_fresh_run_refuses_to_replace_an_exported_adapter(source, tmp_path, monkeypatch):
    """The earlier run's checkpoints are gone, its exported adapter is not: a fresh run is refused up front; once
    the adapter is removed as advised, it runs."""
    lora = dict(lora=True, lora_rank=4, lora_alpha=8, max_steps=1)
    train(_cfg(source, tmp_path, **lora))
    subprocess.run(["bash", "-c", f"rm -r {tmp_path / 'out'}/checkpoint-*"], check=True)
    monkeypatch.setattr(Trainer, "train_step", lambda self: pytest.fail("trained before refusing"))
    with pytest.raises(UserError) as err:
        train(_cfg(source, tmp_path, **lora))
    msg = str(err.value)
    assert msg.startswith(f"output_dir: {tmp_path / 'out'} already holds adapter/ exported by an earlier run")
    assert "give it another output_dir, or remove the earlier run's exported models" in msg
    monkeypatch.undo()
    _rm_advised(msg)
    result, _ = train(_cfg(source, tmp_path, **lora))
    assert result.failed is None and (tmp_path / "out" / "adapter").is_dir()
