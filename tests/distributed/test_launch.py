"""The launcher's contract without training: device checks, how a failed rank is reported, and a world
started by torchrun (the environment already describes it) trains without a second launch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from surogate.errors import NotAvailableError, UserError
from surogate.runtime.distributed.launch import RankFailedError, check_devices, failure, free_port
from surogate.runtime.distributed.shards import rank_slice, row_range
from surogate.runtime.observe.jsonl import read_log
from tests.distributed.helpers import LORA_RANK, make_root
from tests.runtime.helpers import cli_env, write_yaml, yaml_cfg


def test_cuda_with_fewer_gpus_than_ranks_names_both_numbers(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(NotAvailableError, match=r"runs 2 rank\(s\) per node on the cuda backend but 1 GPU\(s\)"):
        check_devices("cuda", 2)
    check_devices("cuda", 1)


def test_cpu_ranks_are_capped_by_the_cores(monkeypatch):
    """Emulated ranks are full processes: `gpus: 64` on a 2-core machine started 64 of them and took its memory;
    now refused before any starts."""
    import os

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    check_devices("cpu", 8)  # 4 per core
    with pytest.raises(NotAvailableError, match=r"runs 9 rank\(s\) per node on the cpu backend .* 2-core machine"):
        check_devices("cpu", 9)
    with pytest.raises(NotAvailableError, match="lower `gpus`"):
        check_devices("cpu", 10**20)


def test_failure_reports_the_ranks_own_error_and_exit_code(tmp_path):
    (tmp_path / "error-1.json").write_text(json.dumps({"message": "datasets[0].path: no such file", "exit_code": 2}))
    err = failure(1, 2, tmp_path)
    assert isinstance(err, UserError) and err.exit_code == 2 and str(err) == "rank 1: datasets[0].path: no such file"
    killed = failure(3, -9, tmp_path)
    assert killed.exit_code == 1 and "rank 3 was killed by signal SIGKILL" in str(killed)
    crashed = failure(0, 7, tmp_path)
    assert isinstance(crashed, RankFailedError) and crashed.exit_code == 7 and "rank 0 exited with status 7" in str(crashed)


def test_rank_slices_pad_the_last_shards():
    import torch

    full = torch.arange(10.0).reshape(5, 2)
    assert [row_range(5, 2, r) for r in range(2)] == [(0, 3), (3, 5)]
    assert row_range(2, 4, 3) == (2, 2)  # more ranks than rows: an empty (all-padding) shard
    assert rank_slice(full, 3, 0).data_ptr() == full.data_ptr()  # a view when nothing is padded
    last = rank_slice(full, 3, 1)
    assert last.tolist() == [[6.0, 7.0], [8.0, 9.0], [0.0, 0.0]]


def test_torchrun_started_world_trains_once(tmp_path):
    root = make_root(tmp_path)
    cfg = yaml_cfg(root / "model", root / "train.jsonl", root / "torchrun", gpus=2, lora_rank=LORA_RANK,
                   lora_alpha=32, max_steps=2)
    yaml_file = write_yaml(root / "torchrun.yaml", cfg)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "surogate.cli", "sft", str(yaml_file)]
    proc = subprocess.Popen(cmd, env={**cli_env(), "SUROGATE_DIST_TIMEOUT": "120"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:  # never leave torchrun's ranks behind
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, stderr[-3000:]
    assert stdout.count("Surogate run ") == 1  # rank 0's console only
    assert stdout.count("trained 2 step(s)") == 2  # both ranks trained (no nested launch)
    assert [r["step"] for r in read_log(root / "torchrun" / "log.jsonl").steps] == [1, 2]


def test_a_world_started_elsewhere_must_match_the_plan(monkeypatch):
    from types import SimpleNamespace

    from surogate.runtime.session import _check_runnable

    cfg = SimpleNamespace(recipe="bf16", qlora_fp4=False)
    one_rank = SimpleNamespace(meta={"zero": {"world": 1}})
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun --nproc-per-node 2 with a `gpus: 1` config
    with pytest.raises(UserError, match=r"plan is for 1 rank\(s\).*world of 2 processes") as err:
        _check_runnable(one_rank, cfg, "cpu")
    assert err.value.exit_code == 2  # the command line's mistake, not missing hardware (exit 3)
    monkeypatch.setenv("WORLD_SIZE", "1")
    _check_runnable(one_rank, cfg, "cpu")
    monkeypatch.setenv("WORLD_SIZE", "abc")  # was a ValueError traceback
    with pytest.raises(UserError, match=r"environment variable WORLD_SIZE='abc': expected an integer from 1"):
        _check_runnable(one_rank, cfg, "cpu")


@pytest.mark.parametrize(("env", "words"), [
    ({"RANK": "x"}, "environment variable RANK='x': expected an integer from 0"),
    ({"RANK": "-1"}, "environment variable RANK='-1'"),
    ({"WORLD_SIZE": "0"}, "environment variable WORLD_SIZE='0'"),
    ({"WORLD_SIZE": "1e3"}, "environment variable WORLD_SIZE='1e3'"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2 and WORLD_SIZE=2: RANK must be below WORLD_SIZE"),
])
def test_bad_rank_environment_is_a_user_error_naming_the_variable(monkeypatch, env, words):
    from surogate.runtime.distributed import comm
    from surogate.runtime.session import run_training

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(UserError, match=words):
        comm.env_rank()
    with pytest.raises(UserError, match=words):  # the first thing a run reads (is this the main rank?)
        run_training(None)


@pytest.mark.parametrize("value", ["abc", "-5", "0", "nan", "inf", "1e300"])
def test_bad_dist_timeout_is_refused_before_any_rank_starts(monkeypatch, value):
    from types import SimpleNamespace

    from surogate.runtime.distributed import comm
    from surogate.runtime.distributed.launch import launch_if_needed

    monkeypatch.setenv("SUROGATE_DIST_TIMEOUT", value)
    two_ranks = SimpleNamespace(meta={"zero": {"world": 2}})
    with pytest.raises(UserError, match=rf"SUROGATE_DIST_TIMEOUT='{value}': expected a positive number of seconds"):
        launch_if_needed(SimpleNamespace(), two_ranks, "cpu")  # was a traceback in every rank (or -5000 ms waits)
    with pytest.raises(UserError, match="SUROGATE_DIST_TIMEOUT"):
        comm.init_from_env("cpu")  # a world torchrun started reads it here


def test_dist_timeout_and_ranks_from_the_environment(monkeypatch):
    from surogate.runtime.distributed import comm

    for name in ("SUROGATE_DIST_TIMEOUT", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert comm.env_timeout_s() == comm.DEFAULT_TIMEOUT_S and comm.env_rank() == 0
    monkeypatch.setenv("SUROGATE_DIST_TIMEOUT", "120")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", " 4 ")
    assert comm.env_timeout_s() == 120.0 and comm.env_rank() == 1


class _Exited:
    """A finished worker process as `_first_cause` sees it."""

    def __init__(self, code: int) -> None:
        self.returncode = code

    def poll(self) -> int:
        return self.returncode


@pytest.mark.parametrize(("codes", "named"), [
    ({0: -6, 1: -9}, "rank 1 was killed by signal SIGKILL"),  # rank 0's gloo aborted after losing rank 1
    ({0: -15, 1: -9}, "rank 1 was killed by signal SIGKILL"),  # rank 0 was stopped by the launcher
    ({0: 1, 1: 2}, "rank 1 exited with status 2"),  # a user error outranks the crash it caused
    ({0: -6, 1: 1}, "rank 1 exited with status 1"),
    ({0: 143, 1: 1}, "rank 1 exited with status 1"),  # rank 0 stopped on the launcher's SIGTERM (interrupted)
    ({0: 143, 1: 143}, "rank 0 exited with status 143"),  # a stop signal reached every rank
])
def test_first_cause_names_the_rank_that_failed_first(tmp_path, codes, named):
    from surogate.runtime.distributed.launch import _first_cause

    err = _first_cause({r: _Exited(c) for r, c in codes.items()}, tmp_path)
    assert named in str(err)
