"""A checkpoint that cannot be written (a full disk, a folder gone) stops the run with a message, not a
traceback: the partial folder is removed, the last checkpoint stays the one `latest` names, the command exits 1
(a failed run) saying what it will resume from, and the same command then resumes from it."""

from __future__ import annotations

import errno
import json

import pytest
import torch

from surogate import cli
from surogate.errors import RunFailedError
from surogate.runtime.checkpoint import CheckpointManager
from tests.runtime.helpers import save_model, write_text_data, write_yaml, yaml_cfg


def _disk_full_at(manager: CheckpointManager, stage: str = "tensors_written") -> None:
    def full(at: str) -> None:
        if at == stage:
            raise OSError(errno.ENOSPC, "No space left on device")

    manager._stage = full


def test_a_save_that_fails_keeps_the_last_checkpoint_and_says_so(tmp_path):
    mgr = CheckpointManager(tmp_path)
    with pytest.raises(RunFailedError) as first:
        _disk_full_at(mgr)
        mgr.save(2, {"w": torch.ones(4)}, {"s": 2})
    assert "no checkpoint was saved before it" in str(first.value)
    mgr._stage = lambda at: None
    mgr.save(2, {"w": torch.ones(4)}, {"s": 2})
    _disk_full_at(mgr, "state_written")
    with pytest.raises(RunFailedError) as exc:
        mgr.save(4, {"w": torch.ones(4)}, {"s": 4})
    msg = str(exc.value)
    assert exc.value.exit_code == 1
    assert msg.startswith(f"checkpoint_dir: could not save checkpoint-4 in {tmp_path} (No space left on device)")
    assert f"the last checkpoint is {tmp_path / 'checkpoint-2'}" in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "latest"]  # no partial folder left
    assert CheckpointManager(tmp_path).latest().name == "checkpoint-2"


def test_the_command_exits_1_and_the_same_command_resumes(tmp_path, monkeypatch, capsys):
    save_model(tmp_path / "model", "qwen3")
    write_text_data(tmp_path / "train.jsonl", rows=48)
    out = tmp_path / "out"
    cfg = write_yaml(tmp_path / "run.yaml", yaml_cfg(tmp_path / "model", tmp_path / "train.jsonl", out, max_steps=6,
                                                      save_steps=2))
    real_save, saves = CheckpointManager.save, []

    def save(self, step, *args, **kwargs):
        saves.append(step)
        if step == 4:
            _disk_full_at(self)
        try:
            return real_save(self, step, *args, **kwargs)
        finally:
            self._stage = lambda at: None

    monkeypatch.setattr(CheckpointManager, "save", save)
    assert cli.main(["sft", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"error: output_dir: could not save checkpoint-4 in {out} (No space left on device)" in err
    assert f"the last checkpoint is {out / 'checkpoint-2'}" in err
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert records[-1]["type"] == "end" and records[-1]["status"] == "failed"
    assert any(r.get("event") == "run_failed" and "could not save checkpoint-4" in r["message"] for r in records)
    assert not (out / "adapter").exists()

    monkeypatch.setattr(CheckpointManager, "save", real_save)  # space freed: the same command resumes
    assert cli.main(["sft", str(cfg)]) == 0
    steps = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    start = [r for r in steps if r["type"] == "start"][-1]
    assert start["first_step"] == 2 and (out / "adapter" / "adapter_model.safetensors").is_file()
