"""`surogate sft` with `gpus: 2` on the cpu backend: two gloo ranks train, rank 0 writes one log and one set of
outputs (exit 0); a worker's error reaches the user with its exit code (bad dataset path: exit 2, the message
names the path); a worker killed mid-run makes the launcher exit non-zero naming that rank, and no rank is left."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from surogate.runtime.observe.jsonl import read_log
from tests.distributed.helpers import LORA_RANK, make_root
from tests.runtime.helpers import cli_env, run_cli, surogate_cmd, write_yaml, yaml_cfg


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_root(tmp_path_factory.mktemp("dist_cli"))


def _yaml(root: Path, name: str, **over) -> Path:
    opts = {**dict(gpus=2, lora_rank=LORA_RANK, lora_alpha=32, max_steps=3, zero_level=2), **over}
    cfg = yaml_cfg(root / "model", root / "train.jsonl", root / name, **opts)
    return write_yaml(root / f"{name}.yaml", cfg)


def test_sft_two_ranks_trains_and_writes_once(root):
    done = run_cli("sft", str(_yaml(root, "ok")))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 ranks, ZeRO-2 layout; CPU processes (gloo) emulate the GPUs" in done.stdout
    assert done.stdout.count("Surogate run ") == 1  # one console: rank 0's
    steps = read_log(root / "ok" / "log.jsonl").steps
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert (root / "ok" / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((root / "ok" / "adapter" / "adapter_config.json").read_text())["r"] == LORA_RANK
    assert sorted(p.name for p in (root / "ok").glob("checkpoint-*")) == ["checkpoint-3"]


def test_bad_dataset_path_exits_2_with_the_workers_message(root):
    cfg = yaml_cfg(root / "model", root / "missing.jsonl", root / "bad", gpus=2, lora_rank=LORA_RANK, max_steps=2)
    done = run_cli("sft", str(write_yaml(root / "bad.yaml", cfg)))
    assert done.returncode == 2, done.stderr[-3000:]
    assert "missing.jsonl" in done.stderr and "rank " in done.stderr
    assert "Traceback" not in done.stderr.split("error: rank")[-1]


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(k) for k in (task / "children").read_text().split()]
    return kids


def _rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in env:
        if item.startswith(b"RANK="):
            return int(item[5:])
    return None


def test_killed_worker_stops_the_run_and_names_its_rank(root):
    proc = subprocess.Popen(surogate_cmd("sft", str(_yaml(root, "killed", max_steps=100000))), env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    workers: dict[int, int] = {}
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None and len(workers) < 2:
            workers = {r: p for p in _children(proc.pid) if (r := _rank_of(p)) is not None}
            time.sleep(0.1)
        assert len(workers) == 2, "the launcher did not start two ranks"
        while time.monotonic() < deadline and not (root / "killed" / "log.jsonl").is_file():
            time.sleep(0.1)  # wait until the ranks are training (inside collectives)
        os.kill(workers[1], signal.SIGKILL)
        code = proc.wait(60)
    finally:
        if proc.poll() is None:  # never leave the launcher or a rank behind
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    stderr = proc.stderr.read()
    assert code not in (0, None)
    assert "rank 1 was killed by signal SIGKILL" in stderr, stderr[-3000:]
    time.sleep(0.5)
    assert not Path(f"/proc/{workers[0]}").exists() or _rank_of(workers[0]) is None  # rank 0 was stopped too
