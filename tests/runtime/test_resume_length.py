"""A resume that changes the run's length (max_steps, num_epochs) says so: the LR schedule spans the new length from
the resumed step on (a finished cosine run resumed for more steps trains with a higher LR than it ended with), and
the start summary and log name the LR the next step trains with."""

from __future__ import annotations

import re
import shutil

from surogate.runtime.observe.jsonl import read_log
from tests.runtime.helpers import run_cli, save_model, write_text_data, write_yaml, yaml_cfg


def test_a_longer_resumed_run_says_how_its_lr_schedule_changed(tmp_path):
    save_model(tmp_path / "model")
    write_text_data(tmp_path / "train.jsonl", rows=32)
    cfg = yaml_cfg(tmp_path / "model", tmp_path / "train.jsonl", tmp_path / "out", max_steps=4, save_steps=2,
                   lr_scheduler_type="cosine")
    first = run_cli("sft", str(write_yaml(tmp_path / "a.yaml", cfg)))
    assert first.returncode == 0, first.stderr[-2000:]
    shutil.rmtree(tmp_path / "out" / "checkpoint-4")  # as if stopped after step 2's checkpoint
    (tmp_path / "out" / "latest").write_text("checkpoint-2\n")
    more = run_cli("sft", str(write_yaml(tmp_path / "b.yaml", {**cfg, "max_steps": 6})))
    assert more.returncode == 0, more.stderr[-2000:]
    found = re.search(r"resume: the run is now 6 steps \(checkpoint-2 was saved in a run of 4\): the cosine LR "
                      r"schedule spans 6 steps from here; step 3 trains with LR (\S+) \((\S+) in the 4-step run\)",
                      more.stdout)
    assert found, more.stdout
    log = read_log(tmp_path / "out" / "log.jsonl")
    lr = {r["step"]: r["lr"] for r in log.steps}
    assert float(found.group(1)) == float(f"{lr[3]:.3g}")
    assert float(found.group(2)) != float(found.group(1))  # the 4-step run's LR at step 3 was another
    start = [e for e in log.events if e["type"] == "start"][-1]
    assert found.group(0) in start["run_info"]["notes"]
    again = run_cli("sft", str(write_yaml(tmp_path / "c.yaml", {**cfg, "max_steps": 6})))  # nothing changed: no note
    assert again.returncode == 0 and "resume: the run is now" not in again.stdout
