"""Checkpoints: bitwise round trip, rotation, crash safety (SIGKILL mid-save), RNG restore, clear errors."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from surogate.errors import RunFailedError, UserError
from surogate.runtime.checkpoint import (
    LATEST_FILE,
    MANIFEST_FILE,
    STATE_FILE,
    TENSORS_FILE,
    CheckpointManager,
    config_fingerprint,
    load,
)
from surogate.schema import config_from_dict


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    arena = torch.randn(64, generator=g)
    w = torch.randn(8, 16, generator=g)
    return {
        "model.layers.0.self_attn.q_proj.weight": w,
        "lm_head.weight": w,  # tied: same tensor under two names
        "bf16": torch.randn(5, 3, generator=g).to(torch.bfloat16),
        "m_q": torch.randint(0, 255, (33,), dtype=torch.uint8, generator=g),
        "absmax": torch.rand(2, generator=g, dtype=torch.float64),
        "view_a": arena[:16].view(4, 4),  # views into one buffer, like arena offsets
        "view_b": arena[16:48],
        "transposed": w.t(),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "nan": torch.tensor([float("nan"), float("inf"), -0.0]),
    }


STATE = {
    "optimizer": {"step": 17, "beta1_power": 0.9**17, "lr": 1.234e-4},
    "lr_schedule": {"step": 17, "scale": 0.5, "reductions": 1, "total_steps": 100, "schedule": "cosine"},
    "data": {"epoch": 1, "batch_index": 42},
}


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and (
        a.reshape(-1).contiguous().view(torch.uint8).equal(b.reshape(-1).contiguous().view(torch.uint8))
        if a.numel() else True)


def test_round_trip_is_bitwise(tmp_path):
    mgr = CheckpointManager(tmp_path, save_total_limit=3)
    src = _tensors()
    path = mgr.save(17, src, STATE)
    assert path == tmp_path / "checkpoint-17"
    assert (tmp_path / LATEST_FILE).read_text().strip() == "checkpoint-17"
    ck = mgr.load(mgr.latest())
    assert ck.step == 17 and ck.state == STATE
    assert set(ck.tensors) == set(src)
    for name, t in src.items():
        assert _bitwise_equal(t, ck.tensors[name]), name
    assert not list(tmp_path.glob("*.tmp-*"))


def test_rotation_keeps_newest_complete(tmp_path):
    mgr = CheckpointManager(tmp_path, save_total_limit=2)
    for step in (10, 20, 30, 40):
        mgr.save(step, {"w": torch.full((2,), float(step))}, {"s": step})
    assert [p.name for p in mgr.checkpoints()] == ["checkpoint-30", "checkpoint-40"]
    assert mgr.latest().name == "checkpoint-40"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-30", "checkpoint-40", LATEST_FILE]


def test_unlimited_and_resave_same_step(tmp_path):
    mgr = CheckpointManager(tmp_path, save_total_limit=0)
    for step in (1, 2, 3):
        mgr.save(step, {"w": torch.zeros(1)}, {})
    mgr.save(3, {"w": torch.ones(1)}, {"again": True})
    assert len(mgr.checkpoints()) == 3
    ck = load(mgr.latest())
    assert ck.state == {"again": True} and ck.tensors["w"].item() == 1.0


def test_rng_restore_reproduces_draws(tmp_path):
    mgr = CheckpointManager(tmp_path)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.random(), np.random.rand(3), torch.randn(4), np.random.randn()  # advance, with a cached gaussian
    mgr.save(1, {"w": torch.zeros(1)}, {})
    expected = (random.random(), np.random.randn(5).tolist(), torch.randn(6).tolist(), torch.randint(0, 9, (4,)).tolist())
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    load(mgr.latest()).restore_rng()
    got = (random.random(), np.random.randn(5).tolist(), torch.randn(6).tolist(), torch.randint(0, 9, (4,)).tolist())
    assert got == expected


def test_exception_between_files_leaves_previous_latest(tmp_path):
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, {"w": torch.zeros(3)}, {"k": 1})

    def boom(stage: str) -> None:
        if stage == "state_written":
            raise OSError("disk full")

    mgr._stage = boom
    with pytest.raises(RunFailedError, match=r"could not save checkpoint-2 .*\(disk full\)"):  # no traceback
        mgr.save(2, {"w": torch.ones(3)}, {"k": 2})
    assert not list(tmp_path.glob("*.tmp-*"))  # cleaned on the way out
    assert mgr.latest().name == "checkpoint-1"
    assert load(mgr.latest()).state == {"k": 1}


def _save_and_hang(directory: str, stage_to_hang: str, conn) -> None:
    mgr = CheckpointManager(directory, save_total_limit=1)

    def hang(stage: str) -> None:
        if stage == stage_to_hang:
            conn.send(stage)
            time.sleep(60)

    mgr._stage = hang
    # ~16 MB of tensors: big enough that the write is a real multi-syscall file
    mgr.save(2, {"big": torch.arange(4 * 1024 * 1024, dtype=torch.float32), "w": torch.ones(3)}, {"k": 2})
    conn.send("done")


@pytest.mark.parametrize("stage,expect_step", [
    ("tensors_written", 1), ("state_written", 1), ("manifest_written", 1),
    ("renamed", 2), ("latest_updated", 2), ("rotating", 2),
])
def test_sigkill_mid_save_never_breaks_latest(tmp_path, stage, expect_step):
    CheckpointManager(tmp_path, save_total_limit=1).save(1, {"w": torch.zeros(3)}, {"k": 1})
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_save_and_hang, args=(str(tmp_path), stage, child))
    proc.start()
    assert parent.poll(30), "child never reached the stage"
    assert parent.recv() == stage
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    leftovers = {"tensors_written": "*.tmp-*", "state_written": "*.tmp-*", "manifest_written": "*.tmp-*",
                 "rotating": "*.del-*"}
    if stage in leftovers:  # the kill really interrupted a save in progress
        assert list(tmp_path.glob(leftovers[stage]))
    mgr = CheckpointManager(tmp_path, save_total_limit=1)
    latest = mgr.latest()
    assert latest is not None and latest.name == f"checkpoint-{expect_step}"
    ck = load(latest)
    assert ck.state == {"k": expect_step}
    assert not list(tmp_path.glob("*.tmp-*")) and not list(tmp_path.glob("*.del-*"))  # stale ones removed


def _resave_and_hang(directory: str, conn) -> None:
    mgr = CheckpointManager(directory)

    def hang(stage: str) -> None:
        if stage == "moved_aside":
            conn.send(stage)
            time.sleep(60)

    mgr._stage = hang
    mgr.save(1, {"w": torch.ones(3)}, {"k": "new"})


def test_sigkill_while_replacing_the_same_step_restores_it(tmp_path):
    CheckpointManager(tmp_path).save(1, {"w": torch.zeros(3)}, {"k": "old"})
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_resave_and_hang, args=(str(tmp_path), child))
    proc.start()
    assert parent.poll(30) and parent.recv() == "moved_aside"
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    assert not (tmp_path / "checkpoint-1").exists()  # the crash window: moved aside, new one not yet in place
    latest = CheckpointManager(tmp_path).latest()
    assert latest is not None and load(latest).state == {"k": "old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1", LATEST_FILE]


def test_partial_folder_and_stale_pointer_are_ignored(tmp_path):
    mgr = CheckpointManager(tmp_path)
    mgr.save(5, {"w": torch.zeros(1)}, {"k": 5})
    (tmp_path / "checkpoint-9").mkdir()  # no manifest: an interrupted foreign copy
    (tmp_path / "checkpoint-9" / TENSORS_FILE).write_bytes(b"junk")
    (tmp_path / LATEST_FILE).write_text("checkpoint-9\n")
    assert mgr.latest().name == "checkpoint-5"


def test_corruption_is_a_user_error_naming_the_folder(tmp_path):
    mgr = CheckpointManager(tmp_path)
    path = mgr.save(3, {"w": torch.zeros(100)}, {"k": 3})
    data = bytearray((path / TENSORS_FILE).read_bytes())
    data[-1] ^= 0xFF
    (path / TENSORS_FILE).write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"checkpoint-3.*tensors.safetensors does not match its sha256"):
        load(path)
    assert mgr.latest() is None  # the only checkpoint is corrupt: nothing to resume from
    (path / TENSORS_FILE).write_bytes(bytes(data[:-10]))
    with pytest.raises(UserError, match="truncated"):
        load(path)
    (path / MANIFEST_FILE).unlink()
    with pytest.raises(UserError, match="no manifest.json"):
        load(path)
    with pytest.raises(UserError, match="no such directory"):
        load(tmp_path / "checkpoint-404")


def test_future_format_version_is_rejected(tmp_path):
    path = CheckpointManager(tmp_path).save(1, {"w": torch.zeros(1)}, {})
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    manifest["version"] = 99
    (path / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="format version 99"):
        load(path)


def test_incompatible_config_names_the_options(tmp_path):
    base = {"model": "Qwen/Qwen3-0.6B", "output_dir": str(tmp_path)}
    saved_cfg = config_from_dict(base | {"learning_rate": 1e-4, "save_steps": 10})
    path = CheckpointManager.from_config(saved_cfg).save(1, {"w": torch.zeros(1)}, {})
    same = config_from_dict(base | {"learning_rate": 1e-4, "save_steps": 99})
    assert CheckpointManager.from_config(same).load(path).step == 1  # save_steps does not affect training
    assert load(path, expect_config=config_fingerprint(same)).step == 1
    other = config_from_dict(base | {"learning_rate": 3e-4, "lora_rank": 8})
    with pytest.raises(UserError, match=r"checkpoint-1.*learning_rate: 0.0001 -> 0.0003.*lora_rank: 16 -> 8"):
        CheckpointManager.from_config(other).load(path)
    with pytest.raises(UserError, match="different config"):
        load(path, expect_config=other)
    assert load(path).step == 1  # no expectation: no check


def test_state_file_is_plain_json(tmp_path):
    path = CheckpointManager(tmp_path).save(4, {"w": torch.zeros(1)}, STATE)
    doc = json.loads((path / STATE_FILE).read_text())
    assert doc["step"] == 4 and doc["state"] == STATE and "python" in doc["rng"]


def test_from_config_uses_checkpoint_dir_or_output_dir(tmp_path):
    cfg = config_from_dict({"model": "m", "output_dir": str(tmp_path / "out"), "save_total_limit": 2})
    assert CheckpointManager.from_config(cfg).dir == Path(tmp_path / "out")
    cfg = config_from_dict({"model": "m", "output_dir": "x", "checkpoint_dir": str(tmp_path / "ck")})
    mgr = CheckpointManager.from_config(cfg)
    assert mgr.dir == tmp_path / "ck" and mgr.save_total_limit == 5


@pytest.mark.gpu
def test_cuda_tensors_and_cuda_rng_round_trip(tmp_path):
    mgr = CheckpointManager(tmp_path)
    t = torch.randn(4, 4, device="cuda").to(torch.bfloat16)
    torch.cuda.manual_seed_all(3)
    torch.randn(2, device="cuda")
    mgr.save(1, {"t": t}, {})
    expected = torch.randn(5, device="cuda").cpu()
    torch.cuda.manual_seed_all(99)
    ck = load(mgr.latest())
    ck.restore_rng()
    assert torch.equal(torch.randn(5, device="cuda").cpu(), expected)
    assert _bitwise_equal(ck.tensors["t"], t.cpu())
