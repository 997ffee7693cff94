"""A resume refuses data or base weights changed in place since the checkpoint (same paths, so the config
fingerprint agrees): the data position or the adapter would otherwise continue in another run's data or base
model. A file only touched (same content) resumes."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import yaml

from surogate.runtime.checkpoint_config import ConfigMismatchError
from surogate.runtime.data.split import TokenizedSplit
from surogate.runtime.run_identity import check_same_identity, split_identity
from tests.runtime.helpers import run_cli, save_model, write_text_data, write_yaml, yaml_cfg


def _split(tokens: list[int]) -> TokenizedSplit:
    n = len(tokens)
    return TokenizedSplit(np.array(tokens, np.int32), np.ones(n, np.uint8), np.array([0, n], np.int64),
                          np.array([0, 1], np.int64), np.array([0], np.int64), seq_len=8, pad_token_id=0)


def test_split_identity_sees_one_changed_token():
    a, b = split_identity(_split([5, 6, 7])), split_identity(_split([5, 6, 8]))
    assert a["rows"] == b["rows"] == 1 and a["tokens"] == b["tokens"] == 3
    assert a["sha256"] != b["sha256"]
    assert split_identity(_split([5, 6, 7])) == a


def test_identity_check_names_what_changed(tmp_path):
    saved = {"data": {"train": split_identity(_split([5, 6, 7])), "eval": None},
             "model": {"model/model.safetensors": {"size": 10, "sha256": "aa"}}}
    check_same_identity(saved, json.loads(json.dumps(saved)), tmp_path)  # the same: no error
    check_same_identity(None, saved, tmp_path)  # a checkpoint from before the record: not checked
    other = {"data": {"train": split_identity(_split([5, 6])), "eval": None}, "model": saved["model"]}
    with pytest.raises(ConfigMismatchError, match=r"training data differs .*1 packed rows, 3 tokens; now 1 packed "
                                                   r"rows, 2 tokens.*put back the data it"):
        check_same_identity(saved, other, tmp_path)
    moved = {"data": saved["data"], "model": {"model/model.safetensors": {"size": 10, "sha256": "bb"}}}
    with pytest.raises(ConfigMismatchError, match=r"frozen base weights.*model/model\.safetensors.*model weights"):
        check_same_identity(saved, moved, tmp_path)


@pytest.fixture
def finished_run(tmp_path):
    """A LoRA run of 2 steps with a checkpoint at step 2; its config resumed to 4 steps."""
    save_model(tmp_path / "model")
    write_text_data(tmp_path / "train.jsonl", rows=32)
    out = tmp_path / "out"
    cfg = yaml_cfg(tmp_path / "model", tmp_path / "train.jsonl", out, max_steps=2, save_steps=2)
    first = run_cli("sft", str(write_yaml(tmp_path / "a.yaml", cfg)))
    assert first.returncode == 0, first.stderr[-2000:]
    return tmp_path, out, write_yaml(tmp_path / "b.yaml", {**cfg, "max_steps": 4})


def test_resume_refuses_a_data_file_changed_in_place(finished_run):
    root, out, resume = finished_run
    data = root / "train.jsonl"
    rows = data.read_text().splitlines()
    data.write_text("\n".join([json.dumps({"text": "w5 w6 w7 w8 w9"}), *rows[1:]]) + "\n")  # one row changed
    run = run_cli("sft", str(resume))
    assert run.returncode == 2, run.stderr[-2000:]
    assert "the training data differs" in run.stderr and "put back the data" in run.stderr
    assert not (out / "checkpoint-4").exists()
    data.write_text("\n".join(rows) + "\n")  # back as it was (a new mtime: the data is tokenized again)
    os.utime(data, (1, 1))
    again = run_cli("sft", str(resume))
    assert again.returncode == 0, again.stderr[-2000:]
    assert (out / "checkpoint-4").is_dir()


def test_resume_refuses_base_weights_replaced_in_place(finished_run):
    root, out, resume = finished_run
    save_model(root / "model", seed=7)  # the same architecture and path, other weights
    run = run_cli("sft", str(resume))
    assert run.returncode == 2, run.stderr[-2000:]
    assert "frozen base weights" in run.stderr and "model/model.safetensors" in run.stderr
    assert not (out / "checkpoint-4").exists()


def test_only_paths_differing_is_a_move_to_prove(tmp_path):
    from surogate.runtime.checkpoint_config import MovedPathsError, check_config_compatible
    from surogate.runtime.run_identity import check_moved

    ds = {"path": "/a/train.jsonl", "type": "text"}
    saved = {"hash": "1", "options": {"model": "/a/model", "datasets": [ds], "learning_rate": 1e-3}}
    moved = {"hash": "2", "options": {"model": "/b/model", "datasets": [{**ds, "path": "/b/train.jsonl"}],
                                      "learning_rate": 1e-3}}
    with pytest.raises(MovedPathsError) as err:
        check_config_compatible(saved, moved, "ck")
    assert err.value.moved == ["datasets[0].path: '/a/train.jsonl' -> '/b/train.jsonl'", "model: '/a/model' -> '/b/model'"]
    other = {"hash": "3", "options": {**moved["options"], "learning_rate": 2e-3}}
    with pytest.raises(ConfigMismatchError) as err:  # another option too: no move to prove
        check_config_compatible(saved, other, "ck")
    assert not isinstance(err.value, MovedPathsError) and "learning_rate" in str(err.value)
    record = {"data": {"train": split_identity(_split([5, 6, 7])), "eval": None}, "model": None,
              "model_config": {"size": 3, "sha256": "c"}}
    note = check_moved(record, record, err_moved := ["model: '/a/model' -> '/b/model'"], tmp_path / "checkpoint-2")
    assert note.startswith("resume: model: '/a/model' -> '/b/model': moved") and "checkpoint-2" in note
    for older in ({k: v for k, v in record.items() if k != "model_config"}, None):  # written before the record held it
        with pytest.raises(ConfigMismatchError, match=r"holds no record of the .*model config\.json"):
            check_moved(older, record, err_moved, tmp_path)
    with pytest.raises(ConfigMismatchError, match=r"no record of the base weights"):
        check_moved(record, {**record, "model": {"model/model.safetensors": {"size": 1, "sha256": "x"}}}, err_moved,
                    tmp_path)


def test_resume_follows_a_moved_model_and_data_with_the_same_content(finished_run):
    root, out, resume = finished_run
    (root / "model").rename(root / "model-moved")
    (root / "train.jsonl").rename(root / "moved.jsonl")
    cfg = yaml.safe_load(resume.read_text())
    cfg["model"], cfg["datasets"][0]["path"] = str(root / "model-moved"), str(root / "moved.jsonl")
    run = run_cli("sft", str(write_yaml(root / "moved.yaml", cfg)))
    assert run.returncode == 0, run.stderr[-2000:]
    assert "moved; the same content as checkpoint-2" in run.stdout + run.stderr
    assert (out / "checkpoint-4").is_dir()


def test_resume_refuses_a_moved_model_whose_config_changed(finished_run):
    root, out, resume = finished_run
    (root / "model").rename(root / "model-moved")
    config = json.loads((root / "model-moved" / "config.json").read_text())
    config["rms_norm_eps"] = 1e-3  # the same shapes and weights, other arithmetic
    (root / "model-moved" / "config.json").write_text(json.dumps(config))
    cfg = yaml.safe_load(resume.read_text())
    cfg["model"] = str(root / "model-moved")
    run = run_cli("sft", str(write_yaml(root / "moved.yaml", cfg)))
    assert run.returncode == 2, run.stderr[-2000:]
    assert "the model's config.json differs" in run.stderr
    assert not (out / "checkpoint-4").exists()
