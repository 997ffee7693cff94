"""`distributed.num_nodes: 2` through Ray: a local Ray cluster (`ray_address: local`) places one worker group
per (emulated) node; the two nodes' ranks form one gloo world and train what one process trains on the same
global batch. Without Ray installed, the launch is refused naming the extra to install. A stop signal to the
command reaches the ranks on the nodes: they save a checkpoint, the command exits 128 + the signal's number, and
the same command resumes (slow: `pytest -m slow`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from surogate.errors import NotAvailableError
from surogate.runtime.observe.jsonl import read_log
from surogate.runtime.session import run_training
from tests.distributed.helpers import cfg_for, exported, make_root, max_rel
from tests.runtime.helpers import (
    cli_env,
    run_cli,
    save_model,
    surogate_cmd,
    write_text_data,
    write_yaml,
    yaml_cfg,
)

# same program at every world size: conftest.py says why; Ray clusters: one test at a time (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("same_program_at_every_world_size", "ray_to_itself")


def test_without_ray_num_nodes_2_names_the_extra(tmp_path, monkeypatch):
    from surogate.runtime.distributed.ray_launch import launch_ray

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as if it were not installed
    with pytest.raises(NotAvailableError, match=r"pip install 'surogate\[ray\]'"):
        launch_ray(cfg=None, plan=None, backend="cpu", nodes=2)


def test_two_nodes_on_a_local_ray_cluster_equal_one_process(tmp_path):
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'surogate[ray]')")
    root = make_root(tmp_path)
    nodes = dict(distributed={"num_nodes": 2, "gpus_per_node": 1, "ray_address": "local",
                              "worker_output_dir": str(tmp_path / "workers")})
    two = run_training(cfg_for(root, "ray", gpus=1, accumulation=1, validation_split_ratio=0.0, **nodes),
                       backend="cpu")
    one = run_training(cfg_for(root, "one", gpus=1, accumulation=2, validation_split_ratio=0.0), backend="cpu")
    assert len(two.losses) == len(one.losses) == 3
    for a, b in zip(two.losses, one.losses, strict=True):
        assert abs(a - b) <= 1e-5 * abs(b)
    got, want = exported(root / "ray", lora=True), exported(root / "one", lora=True)
    assert set(got) == set(want) and all(max_rel(got[k], want[k]) <= 1e-5 for k in want)
    # each node tokenized into its own folder
    assert (tmp_path / "workers" / "node-0" / "tokenized").is_dir()
    assert (tmp_path / "workers" / "node-1" / "tokenized").is_dir()


def test_ray_address_auto_without_a_cluster_is_not_available(tmp_path, monkeypatch):
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'surogate[ray]')")
    from surogate.compiler.pipeline import compile_plan
    from surogate.runtime.distributed.ray_launch import launch_ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    root = make_root(tmp_path)
    cfg = cfg_for(root, "auto", gpus=1, accumulation=1,
                  distributed={"num_nodes": 2, "gpus_per_node": 1, "ray_address": "auto"})
    with pytest.raises(NotAvailableError, match=r"no Ray cluster at 'auto'.*ray_address: local"):
        launch_ray(cfg, compile_plan(cfg), "cpu", 2)


def test_a_failing_node_stops_the_run_with_its_error(tmp_path):
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'surogate[ray]')")
    from surogate.runtime.distributed.launch import RankFailedError

    root = make_root(tmp_path)
    cfg = cfg_for(root, "fail", gpus=1, accumulation=1, validation_split_ratio=0.0,
                  datasets=[{"path": str(tmp_path / "missing.jsonl"), "type": "text"}],
                  distributed={"num_nodes": 2, "gpus_per_node": 1, "ray_address": "local"})
    with pytest.raises(RankFailedError, match=r"node \d: rank \d: datasets\[0\]\.path: .*missing\.jsonl") as err:
        run_training(cfg, backend="cpu")
    assert err.value.exit_code == 2


def test_the_driver_passes_a_stop_signal_on_until_each_nodes_ranks_have_it():
    """`NodeAgent.stop` answers False while its node's ranks have not started: the driver asks again at its next
    poll; a later signal goes to the nodes still running (their ranks say they are already stopping)."""
    from surogate.runtime.distributed.ray_launch import _PassOn
    from surogate.runtime.stop_signals import Relay

    class Call:  # a finished `stop` call and its answer
        def __init__(self, value):
            self.value = value

    class FakeRay:
        def wait(self, refs, timeout=None):
            return refs, []

        def get(self, call):
            return call.value

    class Agent:  # agent.stop.remote(signum) -> Call
        def __init__(self, answers):
            self.answers, self.got, self.stop = list(answers), [], self

        def remote(self, signum):
            self.got.append(signum)
            return Call(self.answers.pop(0) if self.answers else True)

    agents = [Agent([True]), Agent([False, False, True])]
    relay = Relay()
    pass_on = _PassOn(FakeRay(), agents, relay)
    pass_on({0, 1})
    assert agents[0].got == agents[1].got == []  # no signal yet
    relay.signals.append(signal.SIGTERM)
    for _ in range(5):
        pass_on({0, 1})
    assert agents[0].got == [signal.SIGTERM] and agents[1].got == [signal.SIGTERM] * 3
    relay.signals.append(signal.SIGINT)
    pass_on({1})
    assert agents[0].got == [signal.SIGTERM] and agents[1].got == [signal.SIGTERM] * 3 + [signal.SIGINT]


def test_the_placement_group_is_released_however_the_launch_ends(tmp_path, monkeypatch):
    """A cluster that never offers the nodes (and a launch interrupted before any rank ran) gives the reserved
    resources back: on a remote cluster nothing else would (ray.shutdown only does for a local one)."""
    import types

    from surogate.compiler.pipeline import compile_plan
    from surogate.runtime.distributed import ray_launch

    removed = []
    fake = types.ModuleType("ray")
    fake.is_initialized = lambda: True  # connected already: launch_ray neither starts nor stops Ray
    fake.wait = lambda refs, num_returns=1, timeout=None: ([], refs)  # never ready
    group = types.SimpleNamespace(ready=lambda: "ready-ref")
    pg = types.ModuleType("ray.util.placement_group")
    pg.placement_group = lambda bundles, strategy: group
    pg.remove_placement_group = removed.append
    strategies = types.ModuleType("ray.util.scheduling_strategies")
    strategies.PlacementGroupSchedulingStrategy = object
    for name, module in (("ray", fake), ("ray.util", types.ModuleType("ray.util")),
                         ("ray.util.placement_group", pg), ("ray.util.scheduling_strategies", strategies)):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(ray_launch, "READY_TIMEOUT_S", 0.05)
    root = make_root(tmp_path)
    cfg = cfg_for(root, "pg", gpus=1, accumulation=1,
                  distributed={"num_nodes": 2, "gpus_per_node": 1, "ray_address": "auto"})
    with pytest.raises(NotAvailableError, match="did not offer 2 node"):
        ray_launch.launch_ray(cfg, compile_plan(cfg), "cpu", 2)
    assert removed == [group]
    monkeypatch.setattr(ray_launch, "READY_TIMEOUT_S", 60.0)
    monkeypatch.setattr(ray_launch, "_ready", lambda *a: (_ for _ in ()).throw(ray_launch.Interrupted(15)))
    with pytest.raises(ray_launch.Interrupted):
        ray_launch.launch_ray(cfg, compile_plan(cfg), "cpu", 2)
    assert removed == [group, group]


def _steps_logged(log) -> int:
    return len(read_log(log).steps) if log.is_file() else 0


# two emulated nodes through the CLI, stopped mid-run (and resumed): 40-80 s each on 2 cores
@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_reaches_the_ranks_of_every_node_which_save_and_the_run_resumes(tmp_path, signum):
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'surogate[ray]')")
    save_model(tmp_path / "model", "qwen3")
    write_text_data(tmp_path / "train.jsonl", rows=48)
    out = tmp_path / "run"
    cfg = yaml_cfg(tmp_path / "model", tmp_path / "train.jsonl", out, max_steps=5000, save_steps=1000,
                   distributed={"num_nodes": 2, "gpus_per_node": 1, "ray_address": "local",
                                "worker_output_dir": str(tmp_path / "workers")})
    yaml_file = write_yaml(tmp_path / "run.yaml", cfg)
    proc = subprocess.Popen(surogate_cmd("sft", str(yaml_file)), env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None and _steps_logged(out / "log.jsonl") < 3:
            time.sleep(0.05)
        assert proc.poll() is None, f"the run ended before the signal:\n{proc.stderr.read()[-3000:]}"
        proc.send_signal(signum)  # the CLI only: its ranks are the Ray actors' children, not its own
        if signum == signal.SIGINT:
            time.sleep(0.2)
            proc.send_signal(signal.SIGTERM)  # a second signal while stopping: the save is finished all the same
        stdout, stderr = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 128 + signum, stderr[-3000:]
    log = read_log(out / "log.jsonl")
    stopped_at = max(r["step"] for r in log.steps)
    assert stopped_at < 5000 and [p.name for p in out.glob("checkpoint-*")] == [f"checkpoint-{stopped_at}"]
    assert f"interrupted at step {stopped_at}, checkpoint saved" in stdout, stdout[-3000:]
    end = [e for e in log.events if e["type"] == "end"][-1]
    stop_reason = f"{signal.Signals(signum).name} received"
    assert end["status"] == "interrupted" and end["stop_reason"] == stop_reason and end["steps"] == stopped_at
    if signum != signal.SIGTERM:
        return
    resumed = run_cli("sft", str(yaml_file), "--max-steps", str(stopped_at + 2))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming at step {stopped_at}" in resumed.stdout
    assert sorted(r["step"] for r in read_log(out / "log.jsonl").steps) == list(range(1, stopped_at + 3))
