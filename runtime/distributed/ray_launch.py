"""`distributed.num_nodes > 1`: Ray places one worker group per node and each group runs `launch_local`.

One Ray actor per node (a placement group with one bundle per node, spread over distinct nodes; with
`ray_address: local` every bundle is on this machine, which emulates the nodes). Node 0's actor gives the
rendezvous address; every actor starts its node's ranks (global rank = node x ranks-per-node + local rank),
which join one torch.distributed world. Each node tokenizes into its own `worker_output_dir/node-{rank}/`
(default `/tmp/surogate-{run_name}/node-{rank}/`, see `runtime.data.cache.cache_root`).
The first node that fails stops the others and its error is raised here.

A stop signal (SIGTERM, SIGINT) to this process: the ranks are children of the node actors, not of this process
(whose children, with `ray_address: local`, are Ray's own processes), so the launcher's forwarding is relayed
(`stop_signals.relaying`): the handler only records the signal, and the driver, which polls the agents every
POLL_S, passes it to every node (`NodeAgent.stop` signals that actor's children, the ranks; the actor is threaded
so that `stop` runs beside `run`). The ranks stop after the current step, save a checkpoint and exit as in a
one-node run: rank 0's result carries the signal and the command exits 128 + its number (SIGTERM 143, SIGINT
130); a rank stopped outside the training loop reports an interruption with that code, which its node's error
carries. A second signal is passed on as well (the ranks say they are already stopping and finish the save);
the agents are not killed while stopping unless a node fails and the others have not finished within GRACE_S.
A signal before any rank runs raises `Interrupted` (nothing trained yet). `ray.init` replaces the driver's
SIGTERM handler with one that exits at once (tearing down a cluster it started, ranks and all): `_connect` puts
the launcher's handler back. Ray starts its processes with SIGINT blocked and the ranks inherit that mask: they
unblock it first thing (`worker.accept_stop_signals`), or a SIGINT passed on would never arrive.
"""

from __future__ import annotations

import signal
import threading
import time
from typing import Any

from surogate.compiler.plan import Plan
from surogate.errors import NotAvailableError, UserError
from surogate.runtime.distributed.launch import GRACE_S, RankFailedError, free_port, launch_local, plan_world
from surogate.runtime.stop_signals import Interrupted, Relay, forward_to_children, relaying

EXTRA = "pip install 'surogate[ray]'"
READY_TIMEOUT_S = 120.0  # waiting for the cluster to offer one bundle per node
POLL_S = 0.5  # how often the driver, waiting on the cluster, looks for a stop signal to pass on


class NodeAgent:
    """Runs on one node: reports its address, starts that node's ranks (`run`) and, while they run, passes a
    stop signal on to them (`stop`, which needs a threaded actor: max_concurrency=2)."""

    def stop(self, signum: int) -> bool:
        """Send `signum` to this actor's child processes, the node's ranks (which stop after the current step and
        save a checkpoint); False when none is running (yet)."""
        return forward_to_children(signum)

    def address(self) -> tuple[str, int]:
        import ray

        return ray.util.get_node_ip_address(), free_port()

    def run(self, cfg: Any, plan: Plan, backend: str, nodes: int, node_rank: int, addr: str, port: int) -> tuple:
        """("ok", TrainResult or None) or ("error", message, exit_code): errors travel as data, not as pickled
        exception objects."""
        try:
            return "ok", launch_local(cfg, plan, backend, nodes=nodes, node_rank=node_rank, master_addr=addr,
                                      master_port=port)
        except UserError as exc:
            return "error", f"node {node_rank}: {exc}", exc.exit_code
        except Exception as exc:  # noqa: BLE001 - reported by the driver
            return "error", f"node {node_rank}: {type(exc).__name__}: {exc}", 1


def _connect(ray: Any, address: str) -> bool:
    """ray.init for `distributed.ray_address`; True when this call started (and must stop) Ray."""
    if ray.is_initialized():
        return False
    # ray.init installs its own SIGTERM handler (exit at once, tearing down a cluster it started with the ranks in
    # it): the launcher's handler (stop_signals) is put back, so that a SIGTERM stops the ranks with a checkpoint
    kept = signal.getsignal(signal.SIGTERM)
    try:
        if address == "local":
            ray.init(include_dashboard=False, log_to_driver=True)
        else:
            ray.init(address=address, include_dashboard=False, log_to_driver=True)
    except ConnectionError as exc:
        raise NotAvailableError(f"distributed.ray_address: no Ray cluster at {address!r} ({exc}); start one "
                                "(`ray start --head` on the head node, `ray start --address=...` on the others) "
                                "or set ray_address: local to emulate the nodes on this machine") from None
    finally:
        if callable(kept) and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, kept)
    return True


def _ready(ray: Any, refs: list, timeout: float | None, relay: Relay) -> bool:
    """Wait for `refs` (None: no time limit), in POLL_S slices; True when all are ready. A stop signal before
    any rank runs raises `Interrupted`: nothing has been trained, so there is nothing to save."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        if relay.first is not None:
            raise Interrupted(relay.first)
        left = POLL_S if deadline is None else min(POLL_S, deadline - time.monotonic())
        if left <= 0:
            return False
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=left)
        if len(ready) == len(refs):
            return True


class _PassOn:
    """Passes the relayed stop signals on to the nodes still running, from the driver's polling loop."""

    def __init__(self, ray: Any, agents: list, relay: Relay) -> None:
        self.ray, self.agents, self.relay = ray, agents, relay
        self.calls: dict[int, Any] = {}  # node -> its `stop` call with the first signal
        self.delivered: set[int] = set()  # nodes whose ranks got the first signal
        self.passed = 1  # relay.signals[1:passed] (later signals) have been passed on

    def __call__(self, running: set[int]) -> None:
        signum = self.relay.first
        if signum is None:
            return
        for node in sorted(running - self.delivered):
            call = self.calls.get(node)
            if call is not None and not self.ray.wait([call], timeout=0)[0]:
                continue  # still in flight
            if call is not None and self._got(call):
                self.delivered.add(node)
            else:  # not sent yet, or the node's ranks had not started: (again) until they have
                self.calls[node] = self.agents[node].stop.remote(signum)
        for later in self.relay.signals[self.passed:]:  # the ranks say "already stopping" and finish the save
            for node in sorted(running):
                self.agents[node].stop.remote(later)
        self.passed = max(self.passed, len(self.relay.signals))

    def _got(self, call: Any) -> bool:
        """Whether a finished `stop` call reached ranks; an agent that died counts (its run reports that)."""
        try:
            return bool(self.ray.get(call))
        except Exception:  # noqa: BLE001 - the node's own run result carries the failure
            return True


def launch_ray(cfg: Any, plan: Plan, backend: str, nodes: int) -> Any:
    """Train on `nodes` nodes of a Ray cluster; rank 0's TrainResult (its `signal` set when a stop signal ended
    the run with a checkpoint)."""
    try:
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
    except ImportError:
        raise NotAvailableError(f"distributed.num_nodes = {nodes} places one worker group per node with Ray, which "
                                f"is not installed: {EXTRA}") from None
    world = plan_world(plan)
    if world % nodes:
        raise UserError(f"{world} ranks cannot be spread evenly over distributed.num_nodes = {nodes}")
    per_node = world // nodes
    address = str(getattr(cfg.distributed, "ray_address", "auto") or "auto")
    # from before ray.init until after ray.shutdown: a signal is recorded here and passed on to the ranks, never
    # sent to this process's children (a local cluster's own processes)
    with relaying() as relay:
        started = _connect(ray, address)
        try:
            bundle = {"CPU": 1, **({"GPU": per_node} if backend == "cuda" else {})}
            # `local` emulates the nodes on this machine: the bundles need not be on distinct nodes
            strategy = "PACK" if address == "local" else "STRICT_SPREAD"
            group = placement_group([dict(bundle) for _ in range(nodes)], strategy=strategy)
            try:  # the group reserves the nodes' resources: given back however the run ends
                if not _ready(ray, [group.ready()], READY_TIMEOUT_S, relay):
                    raise NotAvailableError(f"the Ray cluster at {address!r} did not offer {nodes} node(s) with {bundle} "
                                            f"each within {READY_TIMEOUT_S:.0f} s (ray status shows what it has)")
                # max_concurrency=2: a threaded actor, so that `stop` runs while `run` waits for the ranks
                agent_cls = ray.remote(num_cpus=1, num_gpus=per_node if backend == "cuda" else 0,
                                       max_concurrency=2)(NodeAgent)
                agents = [agent_cls.options(scheduling_strategy=PlacementGroupSchedulingStrategy(group, i)).remote()
                          for i in range(nodes)]
                where = agents[0].address.remote()
                try:
                    _ready(ray, [where], None, relay)
                except Interrupted:  # no rank started: the agents have nothing to finish
                    for agent in agents:
                        ray.kill(agent)
                    raise
                addr, port = ray.get(where)
                pending = {agents[i].run.remote(cfg, plan, backend, nodes, i, addr, port): i for i in range(nodes)}
                return _collect(ray, agents, pending, relay)
            finally:
                _release(remove_placement_group, group)
        finally:
            if started:
                ray.shutdown()


def _release(remove: Any, group: Any) -> None:
    """Remove the placement group; a failure to do so must not hide how the run ended (Ray frees it at
    shutdown of a local cluster, and `ray status` shows a leftover one on a remote cluster)."""
    try:
        remove(group)
    except Exception:  # noqa: BLE001 - best effort, see the docstring
        pass


def _collect(ray: Any, agents: list, pending: dict, relay: Relay) -> Any:
    """Wait for every node's run, passing stop signals on; rank 0's result, or the first failing node's error."""
    pass_on = _PassOn(ray, agents, relay)
    result = None
    while pending:
        pass_on(set(pending.values()))
        done, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_S)
        if not done:
            continue
        node = pending.pop(done[0])
        outcome = ray.get(done[0])
        if outcome[0] == "error":
            if relay.first is not None and pending:
                # stopping: the others' ranks are stopping too; let them finish and report rather than kill them
                ray.wait(list(pending), num_returns=len(pending), timeout=GRACE_S)
            for agent in agents:  # the others' ranks lose their peers: stop them now
                ray.kill(agent)
            raise RankFailedError(outcome[1], int(outcome[2]))
        if node == 0:
            result = outcome[1]
    return result
