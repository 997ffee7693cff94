"""A resume whose run ends before its checkpoint's step (max_steps or num_epochs lowered below it) is refused: it
exported the checkpoint's model as if it were the shorter run asked for ('already completes the run (1 steps)')."""

from __future__ import annotations

import re

import pytest

from tests.runtime.helpers import run_cli, save_model, write_text_data, write_yaml, yaml_cfg


@pytest.fixture(scope="module")
def run_at_step_4(tmp_path_factory):
    root = tmp_path_factory.mktemp("back")
    save_model(root / "model")
    write_text_data(root / "train.jsonl", rows=6)
    cfg = yaml_cfg(root / "model", root / "train.jsonl", root / "out", max_steps=4, save_steps=2)
    first = run_cli("sft", str(write_yaml(root / "a.yaml", cfg)))
    assert first.returncode == 0, first.stderr[-2000:]
    return root, cfg


def _adapter(root):
    return {p.name: p.read_bytes() for p in sorted((root / "out" / "adapter").iterdir())}


@pytest.mark.parametrize("over, why", [
    ({"max_steps": 3}, "max_steps: 3, but"),
    ({"max_steps": -1, "num_epochs": 1}, r"num_epochs makes the run (\d) steps \(\1 per epoch\), but")])
def test_a_run_shorter_than_its_checkpoint_is_refused(run_at_step_4, over, why):
    root, cfg = run_at_step_4
    before = _adapter(root)
    run = run_cli("sft", str(write_yaml(root / "b.yaml", {**cfg, **over})))
    assert run.returncode == 2, run.stderr[-2000:]
    assert re.search(why, run.stderr), run.stderr
    assert f"{root / 'out' / 'checkpoint-4'}, is at step 4: a run cannot go back" in run.stderr
    assert "set max_steps: 4 (higher to train on)" in run.stderr and "another output_dir" in run.stderr
    assert _adapter(root) == before  # the exported model is the 4-step run's, untouched
    assert "already completes" not in run.stdout
