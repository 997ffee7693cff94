"""`distributed.num_nodes: 2` through Ray: a local Ray cluster (`ray_address: local`) places one worker group
per (emulated) node; the two nodes' ranks form one gloo world and train what one process trains on the same
global batch. Without Ray installed, the launch is refused naming the extra to install."""

from __future__ import annotations

import sys

import pytest

from surogate.errors import NotAvailableError
from surogate.runtime.session import run_training
from tests.distributed.helpers import cfg_for, exported, make_root, max_rel

pytestmark = pytest.mark.usefixtures("same_program_at_every_world_size")  # (conftest.py: why)


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
