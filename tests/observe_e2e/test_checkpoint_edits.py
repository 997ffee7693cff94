"""A checkpoint folder a user has tampered with, as a resume meets it (real `run_training` runs, cpu backend):

- a hand-edited state.json whose manifest hashes were recomputed to match (wrong types, missing fields, values out
  of range, in the trainer's state, the observer's detectors or the RNG state) is a UserError naming the file and
  the field, before any step, never a traceback;
- a `latest` pointer that is a folder is refused before training (it failed every save), and one that turns into a
  folder mid-run costs nothing: the checkpoint is saved, the message says how to go on, and that works.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil

import pytest

from surogate.errors import UserError
from surogate.runtime.checkpoint import LATEST_FILE, MANIFEST_FILE, STATE_FILE, CheckpointManager
from surogate.runtime.trainer import Trainer
from tests.observe_e2e.runs import train, train_cfg

MISSING = object()


def _cfg(source, root, **over):
    base = dict(max_steps=4, save_steps=2, auto_lr_reduction=True, early_stop=True)
    return train_cfg(source, root, **{**base, **over})


@pytest.fixture(scope="module")
def finished(source, tmp_path_factory):
    """A run saved at steps 2 and 4 (every detector on, so the observer's state is in the checkpoint)."""
    root = tmp_path_factory.mktemp("edited")
    train(_cfg(source, root))
    return root


def _edit(doc, dotted, value):
    *parents, last = dotted.split(".")
    for key in parents:
        doc = doc[key]
    if value is MISSING:
        del doc[last]
    else:
        doc[last] = value


def _rehash(folder):
    """Make the manifest match the edited state.json (as a careful hand edit would)."""
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    data = (folder / STATE_FILE).read_bytes()
    manifest["files"][STATE_FILE] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))


@pytest.mark.parametrize("field,value,expected", [
    ("step", "4", "step: expected an integer from 0, found '4'"),
    ("state", MISSING, "state: expected an object, found nothing (missing)"),
    ("config", [], "config: expected an object, found []"),
    ("state.applied", MISSING, "state.applied: expected an integer from 0 to 4, found nothing (missing)"),
    ("state.applied", 9, "state.applied: expected an integer from 0 to 4, found 9"),
    ("state.lr_scale", None, "state.lr_scale: expected a positive number, found None"),
    ("state.data", [0, 4], "state.data: expected an object, found [0, 4]"),
    ("state.data.index", 10**6, "state.data.index: expected an integer from 0 to "),
    ("state.layout.world", "1", "state.layout.world: expected an integer from 1, found '1'"),
    ("state.observer", [], "state.observer: expected an object, found []"),
    ("state.observer.phase._losses", "abc", "state.observer.phase._losses: expected a list of numbers, found 'abc'"),
    ("state.observer.phase.phase", "flying", "state.observer.phase.phase: expected one of ['CONVERGING', "),
    ("state.observer.lr_reducer.reductions", [1], "state.observer.lr_reducer.reductions: expected a list of "),
    ("state.observer.lr_reducer.scale", -1, "state.observer.lr_reducer.scale: expected a number in (0, 1], found -1"),
    ("state.observer.early_stop.convergence_streak", 1.5,
     "state.observer.early_stop.convergence_streak: expected an integer, found 1.5"),
    ("rng.python.words", [1, 2], "rng: expected the generator states the save wrote, found one that does not restore"),
])
def test_a_hand_edited_state_file_names_the_file_and_field(source, finished, tmp_path, monkeypatch, field, value,
                                                           expected):
    shutil.copytree(finished / "out", tmp_path / "out")
    ckpt = tmp_path / "out" / "checkpoint-4"
    doc = json.loads((ckpt / STATE_FILE).read_text())
    _edit(doc, field, value if value is MISSING else copy.deepcopy(value))
    (ckpt / STATE_FILE).write_text(json.dumps(doc))
    _rehash(ckpt)
    monkeypatch.setattr(Trainer, "train_step", lambda self: pytest.fail("trained from an edited checkpoint"))
    with pytest.raises(UserError) as err:
        train(_cfg(source, tmp_path, max_steps=6))
    msg = str(err.value)
    assert msg.startswith(f"{ckpt / STATE_FILE}: {expected}"), msg
    assert f"restore it from a copy, or remove this checkpoint (rm -r {ckpt})" in msg


def test_a_latest_pointer_that_is_a_folder_is_refused_before_training(source, finished, tmp_path, monkeypatch):
    shutil.copytree(finished / "out", tmp_path / "out")
    pointer = tmp_path / "out" / LATEST_FILE
    pointer.unlink()
    pointer.mkdir()
    monkeypatch.setattr(Trainer, "train_step", lambda self: pytest.fail("trained before refusing"))
    with pytest.raises(UserError) as err:
        train(_cfg(source, tmp_path, max_steps=6))
    assert str(err.value).startswith(f"output_dir: {pointer} is a folder, but Surogate keeps its pointer")
    assert f"(rm -r {pointer}); no checkpoint is lost" in str(err.value)
    # the advice works: without it, the run resumes from the newest checkpoint and goes on
    monkeypatch.undo()
    pointer.rmdir()
    result, console = train(_cfg(source, tmp_path, max_steps=6))
    assert result.first_step == 4 and result.steps == 6 and (tmp_path / "out" / "checkpoint-6").is_dir()


def test_a_pointer_turned_folder_mid_run_keeps_the_checkpoint(tmp_path):
    import torch

    mgr = CheckpointManager(tmp_path, field="checkpoint_dir")
    mgr.save(1, {"w": torch.zeros(2)}, {})
    (tmp_path / LATEST_FILE).unlink()
    (tmp_path / LATEST_FILE).mkdir()  # under the running run
    with pytest.raises(UserError) as err:
        mgr.save(2, {"w": torch.ones(2)}, {})
    assert str(err.value) == (f"checkpoint_dir: {tmp_path / 'checkpoint-2'} was saved, but its pointer "
                              f"{tmp_path / LATEST_FILE} could not be updated (Is a directory): move that away and "
                              "run the same command again, which resumes from checkpoint-2")
    assert not list(tmp_path.glob(".latest.tmp-*"))  # no litter
    (tmp_path / LATEST_FILE).rmdir()
    assert CheckpointManager(tmp_path).latest() == tmp_path / "checkpoint-2"


@pytest.mark.parametrize("files", [[], {"state.json": 3}, "x"])
def test_a_manifest_with_a_malformed_file_list_is_an_unusable_checkpoint(tmp_path, files):
    import torch

    path = CheckpointManager(tmp_path).save(1, {"w": torch.zeros(2)}, {})
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    manifest["files"] = files
    (path / MANIFEST_FILE).write_text(json.dumps(manifest))
    fresh = CheckpointManager(tmp_path)
    assert fresh.latest() is None and "files is not an object" in fresh.bad[path]
