"""One checkpoint folder, one run's line of checkpoints (runtime/checkpoint.py).

- rotation and `latest()` keep to this run's line when another run's checkpoints share the folder (F2);
- a checkpoint found corrupt at resume is never kept by rotation in place of a good one (F17a);
- a folder holding checkpoints already, an unusable one, or a file where the folder should be are refused with
  a UserError naming the option (F2, F9).
"""

from __future__ import annotations

import json

import pytest
import torch

from surogate.errors import UserError
from surogate.runtime.checkpoint import LATEST_FILE, MANIFEST_FILE, TENSORS_FILE, CheckpointManager, load


def _save(mgr: CheckpointManager, step: int) -> None:
    mgr.save(step, {"w": torch.full((4,), float(step))}, {"s": step})


def _names(mgr: CheckpointManager) -> list[str]:
    return [p.name for p in mgr.folders()]


def _corrupt(path) -> None:
    """Flip one byte of the tensors file: same size, wrong sha256 (what only a hash check sees)."""
    f = path / TENSORS_FILE
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))


def _old_run(folder) -> None:
    """An earlier run's checkpoints 6 and 8 (save_total_limit 2) in `folder`."""
    old = CheckpointManager(folder, save_total_limit=2)
    for step in (2, 4, 6, 8):
        _save(old, step)
    assert _names(old) == ["checkpoint-6", "checkpoint-8"]


def test_rotation_never_deletes_this_runs_checkpoints_for_another_runs_newer_ones(tmp_path):
    _old_run(tmp_path)
    fresh = CheckpointManager(tmp_path, save_total_limit=2)
    for step in (2, 4):
        _save(fresh, step)
    # step-number rotation used to delete checkpoint-2 (and keep 4, 6, 8); the newer ones are not this run's
    assert _names(fresh) == ["checkpoint-2", "checkpoint-4", "checkpoint-6", "checkpoint-8"]
    _save(fresh, 5)
    assert _names(fresh) == ["checkpoint-4", "checkpoint-5", "checkpoint-6", "checkpoint-8"]


def test_latest_follows_the_pointer_not_a_higher_step_of_another_line(tmp_path):
    _old_run(tmp_path)
    fresh = CheckpointManager(tmp_path, save_total_limit=2)
    for step in (2, 4):
        _save(fresh, step)
    assert CheckpointManager(tmp_path).latest().name == "checkpoint-4"  # was checkpoint-8 (the old run's)
    assert load(CheckpointManager(tmp_path).latest()).state == {"s": 4}


def test_latest_takes_the_save_that_crashed_before_its_pointer_update(tmp_path):
    mgr = CheckpointManager(tmp_path)
    for step in (3, 6):
        _save(mgr, step)
    (tmp_path / LATEST_FILE).write_text("checkpoint-3\n")  # as if the save of 6 died after its rename
    manifest = lambda step: json.loads((tmp_path / f"checkpoint-{step}" / MANIFEST_FILE).read_text())  # noqa: E731
    assert manifest(6)["previous"] == manifest(3)["id"]
    assert CheckpointManager(tmp_path).latest().name == "checkpoint-6"


def test_checkpoints_without_previous_keep_the_old_rule(tmp_path):
    mgr = CheckpointManager(tmp_path)
    for step in (3, 6):
        _save(mgr, step)
    manifest = tmp_path / "checkpoint-6" / MANIFEST_FILE
    data = json.loads(manifest.read_text())
    del data["previous"]  # written by an earlier version
    manifest.write_text(json.dumps(data))
    (tmp_path / LATEST_FILE).write_text("checkpoint-3\n")
    assert CheckpointManager(tmp_path).latest().name == "checkpoint-6"


def test_rotation_keeps_the_good_checkpoint_not_the_corrupt_newer_one(tmp_path):
    first = CheckpointManager(tmp_path, save_total_limit=2)
    for step in (12, 14):
        _save(first, step)
    _corrupt(tmp_path / "checkpoint-14")
    resumed = CheckpointManager(tmp_path, save_total_limit=2)
    start = resumed.latest()
    assert start.name == "checkpoint-12" and "corrupted" in resumed.bad[tmp_path / "checkpoint-14"]
    _save(resumed, 13)  # save_steps changed: step 14 is not saved again before rotation runs
    # the size-only rotation used to delete the good checkpoint-12 and keep the corrupt checkpoint-14
    assert _names(resumed) == ["checkpoint-12", "checkpoint-13", "checkpoint-14"]
    _save(resumed, 16)
    assert _names(resumed) == ["checkpoint-13", "checkpoint-14", "checkpoint-16"]
    assert CheckpointManager(tmp_path).latest().name == "checkpoint-16"
    _save(resumed, 14)  # saving the corrupt step again replaces it
    assert load(tmp_path / "checkpoint-14").state == {"s": 14}


def test_refuse_foreign_names_the_folder_the_checkpoints_and_the_ways_out(tmp_path):
    _old_run(tmp_path)
    with pytest.raises(UserError) as err:
        CheckpointManager(tmp_path, field="output_dir").refuse_foreign()
    msg = str(err.value)
    assert msg.startswith(f"output_dir: {tmp_path}") and "checkpoint-6, checkpoint-8" in msg
    assert "resume_from_checkpoint: true" in msg and f"choose another output_dir, or remove them (rm -r {tmp_path}/" in msg
    assert _names(CheckpointManager(tmp_path)) == ["checkpoint-6", "checkpoint-8"]  # nothing deleted
    CheckpointManager(tmp_path / "empty").refuse_foreign()  # no folder, no checkpoints: fine


def test_refuse_unusable_lists_the_problems(tmp_path):
    mgr = CheckpointManager(tmp_path)
    _save(mgr, 5)
    _corrupt(tmp_path / "checkpoint-5")
    fresh = CheckpointManager(tmp_path)
    assert fresh.latest() is None
    with pytest.raises(UserError, match=r"checkpoint_dir: resume_from_checkpoint is true but none .*checkpoint-5: "
                                        r".*corrupted"):
        fresh.refuse_unusable()


def test_check_writable_refuses_a_file_naming_the_option(tmp_path):
    target = tmp_path / "ckpt"
    target.write_text("not a folder")
    with pytest.raises(UserError, match=rf"^checkpoint_dir: {target} cannot hold checkpoints: {target} is a file"):
        CheckpointManager(target).check_writable()
    with pytest.raises(UserError, match=r"is a file.*choose another output_dir"):
        CheckpointManager(target / "below", field="output_dir").check_writable()
    CheckpointManager(tmp_path / "new" / "dir").check_writable()  # made, and left empty
    assert list((tmp_path / "new" / "dir").iterdir()) == []


def test_check_writable_refuses_an_unwritable_folder(tmp_path, monkeypatch):
    def denied(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr("pathlib.Path.write_bytes", denied)  # root ignores chmod: fake the refusal
    with pytest.raises(UserError, match=r"^checkpoint_dir: cannot write checkpoints into .*Permission denied"):
        CheckpointManager(tmp_path).check_writable()


def test_a_folder_keeps_one_line_id_across_managers_and_a_new_folder_gets_its_own(tmp_path):
    first = CheckpointManager(tmp_path / "a")
    _save(first, 1)
    resumed = CheckpointManager(tmp_path / "a")  # a resumed run continues the line its pointer names
    _save(resumed, 2)
    runs = {json.loads((tmp_path / "a" / f"checkpoint-{s}" / MANIFEST_FILE).read_text())["run"] for s in (1, 2)}
    assert runs == {first.line_id()} and resumed.known_line() == first.line_id()
    other = CheckpointManager(tmp_path / "b")
    assert other.known_line() is None and other.line_id() != first.line_id()


def _guard(tmp_path, checkpoint_dir, marks: dict | None):
    """The run-start guard for a resuming run: output_dir tmp_path/'out' holding an exported adapter whose record
    says `marks` (None: no record, an export of an earlier version), checkpoints in `checkpoint_dir`."""
    from surogate.runtime.resume import guard_checkpoint_dir
    from surogate.runtime.run_exports import EXPORTED_BY_FILE
    from surogate.schema import config_from_dict

    out = tmp_path / "out"
    (out / "adapter").mkdir(parents=True, exist_ok=True)
    (out / "adapter" / "adapter_config.json").write_text("{}")
    record = out / EXPORTED_BY_FILE
    record.unlink(missing_ok=True)
    if marks is not None:
        record.write_text(json.dumps({k: {"run": v, "step": 4} for k, v in marks.items()}))
    cfg = config_from_dict({"model": "Qwen/Qwen3-0.6B", "datasets": [{"path": "d.jsonl", "type": "text"}],
                            "output_dir": str(out), "checkpoint_dir": str(checkpoint_dir),
                            "resume_from_checkpoint": True})
    guard_checkpoint_dir(cfg)


def test_a_resumed_run_refuses_to_replace_another_lines_exports(tmp_path):
    """Checkpoints set apart from a shared output_dir: a run resuming line B must not replace the adapter line A
    exported there at its end (it did: a resuming run was taken to rewrite its own exports); line A resuming, an
    export without a record, or checkpoints saved before lines had ids, go on as before."""
    line_a, line_b = CheckpointManager(tmp_path / "ck-a"), CheckpointManager(tmp_path / "ck-b")
    _save(line_a, 4)
    _save(line_b, 2)
    with pytest.raises(UserError) as exc:
        _guard(tmp_path, tmp_path / "ck-b", {"adapter": line_a.line_id()})
    msg = str(exc.value)
    assert "holds adapter/ exported by another run than the one this run resumes" in msg
    assert str(tmp_path / "ck-b") in msg and f"rm -r {tmp_path / 'out' / 'adapter'}" in msg
    _guard(tmp_path, tmp_path / "ck-a", {"adapter": line_a.line_id()})  # its own line: it rewrites its export
    _guard(tmp_path, tmp_path / "ck-b", None)  # an export made before the record existed
    manifest = tmp_path / "ck-b" / "checkpoint-2" / MANIFEST_FILE
    data = json.loads(manifest.read_text())
    del data["run"]  # a checkpoint saved before lines had ids
    manifest.write_text(json.dumps(data))
    _guard(tmp_path, tmp_path / "ck-b", {"adapter": line_a.line_id()})
