"""What a refused resume advises fits the cause: checkpoints of a newer format are resumed with the newer Surogate
(not 'restored from a copy'), and a checkpoint of this config that lacks tensors was damaged or edited after the save
(not 'written by a different configuration', which the config check had ruled out)."""

from __future__ import annotations

import json

import pytest
import torch

from surogate.errors import UserError
from surogate.runtime.checkpoint import MANIFEST_FILE, CheckpointManager
from tests.runtime.helpers import build_trainer, save_model, text_cfg, write_text_data


def _saved(tmp_path, version):
    manager = CheckpointManager(tmp_path / "ck")
    path = manager.save(3, {"w": torch.ones(2)}, {"x": 1})
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    (path / MANIFEST_FILE).write_text(json.dumps({**manifest, "version": version}))
    manager = CheckpointManager(tmp_path / "ck")
    assert manager.latest() is None
    with pytest.raises(UserError) as err:
        manager.refuse_unusable()
    return str(err.value)


def test_a_newer_format_is_resumed_with_a_newer_surogate(tmp_path):
    msg = _saved(tmp_path, 99)
    assert "checkpoint format version 99 is not supported by this Surogate (it reads version 1; written by a newer " \
           "Surogate)" in msg
    assert "resume them with it (or upgrade this one)" in msg and "Restore them from a copy" not in msg


def test_a_damaged_version_is_restored_from_a_copy(tmp_path):
    msg = _saved(tmp_path, "x")
    assert "format version 'x' is not supported" in msg and "newer" not in msg and "Restore them from a copy" in msg


def test_a_checkpoint_lacking_tensors_says_it_was_damaged(tmp_path):
    save_model(tmp_path / "model")
    cfg = text_cfg(tmp_path / "model", write_text_data(tmp_path / "train.jsonl", rows=16), tmp_path / "out",
                   lora=True, lora_rank=4, lora_alpha=8)
    trainer = build_trainer(cfg)
    trainer.checkpoints = CheckpointManager.from_config(cfg)
    path = trainer.save()
    loaded = trainer.checkpoints.load(path)
    state = next(n for n in loaded.tensors if "@" in n)  # an optimizer state tensor
    del loaded.tensors[state]
    with pytest.raises(UserError) as err:
        trainer.restore(loaded)
    msg = str(err.value)
    assert f"checkpoint lacks 1 tensor(s) of this plan, e.g. {state!r}" in msg
    assert "removed or damaged after the save" in msg and f"rm -r {path}" in msg and "different configuration" not in msg
