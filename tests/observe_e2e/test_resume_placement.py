"""A run that no longer fits resumes with recompute, offloading, chunking or use_fused_rope changed: those options
move tensors or recompute them, not a step's arithmetic or the checkpoint's tensors
(checkpoint_config._PLACEMENT_FREE). The resume says what changed and trains what the uninterrupted run trains; any
other option still refuses it, and checkpoints whose fingerprint hashed these options too resume as well."""

from __future__ import annotations

import json
import shutil

import pytest

from surogate.errors import UserError
from surogate.runtime.checkpoint_config import check_config_compatible, config_fingerprint
from surogate.runtime.observe.jsonl import read_log
from tests.observe_e2e.runs import build_source, train, train_cfg


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return build_source(tmp_path_factory.mktemp("placement"))


def _losses(log) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_log(log).steps}


def test_resume_with_recompute_and_offloading_changed_trains_the_same(source, tmp_path):
    base = dict(max_steps=6, save_steps=3, recompute=False, lora_dropout=0.0, log_file=str(tmp_path / "run.jsonl"))
    train(train_cfg(source, tmp_path / "run", **base))
    straight = _losses(tmp_path / "run.jsonl")
    out = tmp_path / "run" / "out"
    shutil.rmtree(out / "checkpoint-6")  # as if the run had stopped after step 3
    (out / "latest").write_text("checkpoint-3\n")
    changed = train_cfg(source, tmp_path / "run", **{**base, "recompute": True, "offload_optimizer": True,
                                                      "attn_bwd_chunks": 2, "use_fused_rope": True})
    result, console = train(changed)
    assert result.first_step == 3 and result.steps == 6
    assert ("resume: memory and speed options changed since checkpoint-3 (attn_bwd_chunks: 1 -> 2; "
            "offload_optimizer: False -> True; recompute: False -> True; use_fused_rope: False -> True)") in console
    assert _losses(tmp_path / "run.jsonl") == straight  # steps 4-6 trained again, the same losses
    # another option still refuses the resume
    (out / "latest").write_text("checkpoint-3\n")
    with pytest.raises(UserError, match="learning_rate"):
        train(train_cfg(source, tmp_path / "run", **{**base, "learning_rate": 5e-4}))


def test_checkpoints_that_hashed_these_options_resume_too(source, tmp_path):
    """A fingerprint written before `placement` existed kept recompute among its hashed options."""
    cfg = train_cfg(source, tmp_path / "x", recompute=False)
    now = config_fingerprint(cfg)
    old_options = {**now["options"], **now["placement"]}
    old = {"hash": "hashed-with-recompute", "options": json.loads(json.dumps(old_options))}
    again = config_fingerprint(train_cfg(source, tmp_path / "x", recompute=True))
    assert check_config_compatible(old, again, "ck") == ["recompute: False -> True"]
    assert check_config_compatible(old, now, "ck") == []
