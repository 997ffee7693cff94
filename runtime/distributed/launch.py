"""Start the ranks of a multi-rank plan on this node, watch them, and report the first failure.

`run_training` calls `launch_if_needed`: with a plan for world > 1 and no process group it either joins the
world torchrun (or another launcher) described in the environment, or starts `world` worker processes here
(`distributed.num_nodes > 1`: `ray_launch` starts one such group per node). Each worker
(`python -m surogate.runtime.distributed.worker`) joins the process group and runs the same training. The
launcher returns rank 0's result; when a worker fails it terminates the others and raises that rank's error
(UserError keeps its exit code and message), so a failure never leaves ranks waiting on each other.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from surogate.compiler.plan import Plan
from surogate.errors import NotAvailableError, UserError
from surogate.runtime.distributed import comm
from surogate.runtime.distributed.sequence import plan_sp
from surogate.runtime.distributed.worker import LAUNCHER_PID_ENV

ENV_KEYS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
RESULT_FILE = "result.pkl"
GRACE_S = 10.0  # after a failure, how long the other ranks get to exit on SIGTERM before SIGKILL


class RankFailedError(UserError):
    """A worker rank failed; the message names the rank and carries its error. `exit_code` is the rank's
    (2 for a UserError such as a bad dataset path, 3 for NotAvailableError, 1 for a crash or a kill)."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def plan_world(plan: Plan) -> int:
    return int(plan.meta.get("zero", {}).get("world", 1))


def nodes_of(cfg: Any) -> int:
    dist_cfg = getattr(cfg, "distributed", None)
    return max(1, int(getattr(dist_cfg, "num_nodes", 1) or 1))


def rank_notes(plan: Plan, backend: str) -> list[str]:
    """The run's notes about its ranks (shown at the start of the run)."""
    world = plan_world(plan)
    if world <= 1:
        return []
    zero = plan.meta.get("zero", {})
    level = 3 if zero.get("weights") else 2 if zero.get("gradients") else 1
    where = ("CPU processes (gloo) emulate the GPUs" if backend == "cpu" else "GPUs (NCCL)")
    sp = plan_sp(plan)
    if sp > 1:
        return [f"{world} ranks: {world // sp} data-parallel replica(s) x {sp}-way sequence parallelism (each rank "
                f"holds 1/{sp} of every row's tokens and attends with 1/{sp} of the heads), ZeRO-{level} layout; "
                f"{where}; global batch = per_device_train_batch_size x gradient_accumulation_steps x replicas"]
    return [f"data parallel: {world} ranks, ZeRO-{level} layout; {where}; global batch = "
            "per_device_train_batch_size x gradient_accumulation_steps x ranks"]


def launch_if_needed(cfg: Any, plan: Plan, backend: str) -> Any | None:
    """Start or join the world a multi-rank plan needs; the TrainResult of a launch, or None to train here."""
    world = plan_world(plan)
    if world <= 1 or comm.initialized():
        return None
    comm.env_timeout_s()  # a bad SUROGATE_DIST_TIMEOUT is a user error here, before any rank starts
    if all(k in os.environ for k in ENV_KEYS):  # torchrun (or our own worker): join that world
        comm.init_from_env(backend)
        return None
    nodes = nodes_of(cfg)
    if nodes > 1:
        from surogate.runtime.distributed.ray_launch import launch_ray

        return launch_ray(cfg, plan, backend, nodes)
    return launch_local(cfg, plan, backend)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


CPU_RANKS_PER_CORE = 4  # emulated (gloo) ranks per core at most: each is a process with its own model and arena


def check_devices(backend: str, per_node: int) -> None:
    """Refuse a rank count this node cannot hold, before any process starts (NotAvailableError, exit 3)."""
    cores = os.cpu_count() or 1
    if backend == "cpu" and per_node > CPU_RANKS_PER_CORE * cores:
        # every emulated rank is a full process: 64 of them took a 2-core machine's memory and its responsiveness
        raise NotAvailableError(f"this plan runs {per_node} rank(s) per node on the cpu backend (gloo emulation), "
                                f"more than {CPU_RANKS_PER_CORE} per core of this {cores}-core machine; lower `gpus` "
                                "(or distributed.gpus_per_node), or run it on GPUs")
    if backend == "cuda":
        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if have < per_node:
            raise NotAvailableError(f"this plan runs {per_node} rank(s) per node on the cuda backend but "
                                    f"{have} GPU(s) are visible here; set `gpus: {max(have, 1)}` (or "
                                    "distributed.gpus_per_node), or make more GPUs visible (CUDA_VISIBLE_DEVICES)")


def _worker_env(rank: int, local_rank: int, world: int, per_node: int, node_rank: int, addr: str, port: int,
                backend: str) -> dict[str, str]:
    env = dict(os.environ)
    # the worker asks for SIGTERM when this pid dies (worker.die_with_launcher): no rank outlives the launcher
    env[LAUNCHER_PID_ENV] = str(os.getpid())
    env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local_rank), LOCAL_WORLD_SIZE=str(per_node),
               GROUP_RANK=str(node_rank), SUROGATE_NODE_RANK=str(node_rank), MASTER_ADDR=addr, MASTER_PORT=str(port))
    if backend == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # emulated ranks share the CPU: one rank per core-share, not every rank using every core
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // per_node))
    return env


def launch_local(cfg: Any, plan: Plan, backend: str, *, nodes: int = 1, node_rank: int = 0,
                 master_addr: str = "127.0.0.1", master_port: int | None = None) -> Any:
    """Run `world / nodes` ranks of the plan on this node as worker processes; rank 0's TrainResult (None on
    the other nodes). Raises RankFailedError naming the first rank that failed."""
    world = plan_world(plan)
    if world % nodes:
        raise UserError(f"{world} ranks cannot be spread evenly over distributed.num_nodes = {nodes}")
    per_node = world // nodes
    check_devices(backend, per_node)
    port = master_port or free_port()
    with tempfile.TemporaryDirectory(prefix="surogate-ranks-") as tmp:
        work = Path(tmp)
        with open(work / "payload.pkl", "wb") as f:
            pickle.dump({"cfg": cfg, "plan": plan, "backend": backend}, f)
        procs: dict[int, subprocess.Popen] = {}
        try:
            for local in range(per_node):
                rank = node_rank * per_node + local
                env = _worker_env(rank, local, world, per_node, node_rank, master_addr, port, backend)
                procs[rank] = subprocess.Popen([sys.executable, "-m", "surogate.runtime.distributed.worker", str(work)],
                                               env=env)
            _watch(procs, work)
        finally:
            _terminate(procs)
        result_file = work / RESULT_FILE
        if not result_file.is_file():
            return None  # rank 0 runs on another node
        with open(result_file, "rb") as f:
            return pickle.load(f)


def _watch(procs: dict[int, subprocess.Popen], work: Path) -> None:
    """Wait for every rank; on the first failure stop the others and raise that rank's error."""
    pending = dict(procs)
    while pending:
        for rank, proc in list(pending.items()):
            code = proc.poll()
            if code is None:
                continue
            del pending[rank]
            if code != 0:
                raise _first_cause(procs, work)
        time.sleep(0.05)


def _first_cause(procs: dict[int, subprocess.Popen], work: Path) -> RankFailedError:
    """A rank failed: its peers soon fail too (their collectives lose it). Give them a moment, then report
    the likeliest cause: a rank killed by a signal, then a user error (exit 2/3), then the lowest rank."""
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline and any(p.poll() is None for p in procs.values()):
        time.sleep(0.05)
    _terminate(procs)
    failed = {r: p.returncode for r, p in procs.items() if p.returncode not in (0, None)}
    # SIGTERM is ours (_terminate): a rank dies of it, or stops on it (exit 143, "interrupted"; when every rank
    # exited so, a stop signal reached them all and rank 0's report is the cause); SIGABRT is how a peer's
    # collective library dies when it loses a rank
    consequences = (-signal.SIGTERM, -signal.SIGABRT, 128 + signal.SIGTERM)
    killed = [r for r, c in sorted(failed.items()) if c < 0 and c not in consequences]
    errors = {r: failure(r, c, work) for r, c in failed.items()}
    user = [r for r, e in sorted(errors.items()) if e.exit_code in (2, 3)]
    crashed = [r for r, c in sorted(failed.items()) if c not in consequences]
    rank = (killed or user or crashed or sorted(errors))[0]
    return errors[rank]


def failure(rank: int, code: int, work: Path) -> RankFailedError:
    """The error to raise for a rank that exited with `code`: its own message when it left one."""
    report = work / f"error-{rank}.json"
    if report.is_file():
        err = json.loads(report.read_text(encoding="utf-8"))
        return RankFailedError(f"rank {rank}: {err['message']}", int(err.get("exit_code", code) or 1))
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
        return RankFailedError(f"rank {rank} was killed by signal {name}; the other ranks were stopped", 1)
    return RankFailedError(f"rank {rank} exited with status {code}; the other ranks were stopped", code)


def _terminate(procs: dict[int, subprocess.Popen]) -> None:
    live = [p for p in procs.values() if p.poll() is None]
    for p in live:
        p.terminate()
    deadline = time.monotonic() + GRACE_S
    for p in live:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
