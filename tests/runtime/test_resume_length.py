"""A resume that changes the run's length (max_steps, num_epochs) says so: the LR schedule spans the new length from
the resumed step on (a finished cosine run resumed for more steps trains with a higher LR than it ended with), and
the start summary and log name the LR the next step trains with."""

from __future__ import annotations

import re
import shutil

from surogate.runtime.observe.jsonl import read_log
from tests.observe_e2e.runs import build_source, train, train_cfg


def test_a_longer_resumed_run_says_how_its_lr_schedule_changed(tmp_path):
    source = build_source(tmp_path / "src", rows=32)
    base = dict(max_steps=4, save_steps=2, lr_scheduler_type="cosine", log_file=str(tmp_path / "log.jsonl"))
    train(train_cfg(source, tmp_path, **base))
    out = tmp_path / "out"
    shutil.rmtree(out / "checkpoint-4")  # as if stopped after step 2's checkpoint
    (out / "latest").write_text("checkpoint-2\n")
    _, console = train(train_cfg(source, tmp_path, **{**base, "max_steps": 6}))
    found = re.search(r"resume: the run is now 6 steps \(checkpoint-2 was saved in a run of 4\): the cosine LR "
                      r"schedule spans 6 steps from here; step 3 trains with LR (\S+) \((\S+) in the 4-step run\)",
                      console)
    assert found, console
    log = read_log(tmp_path / "log.jsonl")
    lr = {r["step"]: r["lr"] for r in log.steps}
    assert float(found.group(1)) == float(f"{lr[3]:.3g}")
    assert float(found.group(2)) != float(found.group(1))  # the 4-step run's LR at step 3 was another
    start = [e for e in log.events if e["type"] == "start"][-1]
    assert found.group(0) in start["run_info"]["notes"]
    _, again = train(train_cfg(source, tmp_path, **{**base, "max_steps": 6}))  # nothing changed: no note
    assert "resume: the run is now" not in again


def test_a_run_shortened_to_its_checkpoints_step_says_the_model_was_trained_for_a_longer_run(tmp_path):
    """max_steps lowered exactly to the checkpoint's step ends the run there (lower is refused): the exported model
    trained under the longer run's schedule, which the note says (it said only 'already completes the run')."""
    source = build_source(tmp_path / "src", rows=32)
    base = dict(max_steps=4, save_steps=2, lr_scheduler_type="cosine", log_file=str(tmp_path / "log.jsonl"))
    train(train_cfg(source, tmp_path, **base))
    shutil.rmtree(tmp_path / "out" / "checkpoint-4")
    (tmp_path / "out" / "latest").write_text("checkpoint-2\n")
    result, console = train(train_cfg(source, tmp_path, **{**base, "max_steps": 2}))
    assert result.steps == 2
    assert ("resume: the run is now 2 steps and checkpoint-2 ends it, but it was saved in a run of 4: its model is "
            "exported as trained, under that run's cosine LR schedule (which had not reached its end at step 2)"
            ) in console
