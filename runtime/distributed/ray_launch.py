"""`distributed.num_nodes > 1`: Ray places one worker group per node and each group runs `launch_local`.

One Ray actor per node (a placement group with one bundle per node, spread over distinct nodes; with
`ray_address: local` every bundle is on this machine, which emulates the nodes). Node 0's actor gives the
rendezvous address; every actor starts its node's ranks (global rank = node x ranks-per-node + local rank),
which join one torch.distributed world. Each node tokenizes into its own `worker_output_dir/node-{rank}/`
(default `/tmp/surogate-{run_name}/node-{rank}/`, see `runtime.data.cache.cache_root`).
The first node that fails stops the others and its error is raised here.
"""

from __future__ import annotations

from typing import Any

from surogate.compiler.plan import Plan
from surogate.errors import NotAvailableError, UserError
from surogate.runtime.distributed.launch import RankFailedError, free_port, launch_local, plan_world

EXTRA = "pip install 'surogate[ray]'"
READY_TIMEOUT_S = 120.0  # waiting for the cluster to offer one bundle per node


class NodeAgent:
    """Runs on one node: reports its address, then starts that node's ranks."""

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
    try:
        if address == "local":
            ray.init(include_dashboard=False, log_to_driver=True)
        else:
            ray.init(address=address, include_dashboard=False, log_to_driver=True)
    except ConnectionError as exc:
        raise NotAvailableError(f"distributed.ray_address: no Ray cluster at {address!r} ({exc}); start one "
                                "(`ray start --head` on the head node, `ray start --address=...` on the others) "
                                "or set ray_address: local to emulate the nodes on this machine") from None
    return True


def launch_ray(cfg: Any, plan: Plan, backend: str, nodes: int) -> Any:
    """Train on `nodes` nodes of a Ray cluster; rank 0's TrainResult."""
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
    started = _connect(ray, address)
    try:
        bundle = {"CPU": 1, **({"GPU": per_node} if backend == "cuda" else {})}
        # `local` emulates the nodes on this machine: the bundles need not be on distinct nodes
        strategy = "PACK" if address == "local" else "STRICT_SPREAD"
        group = placement_group([dict(bundle) for _ in range(nodes)], strategy=strategy)
        ready, _ = ray.wait([group.ready()], timeout=READY_TIMEOUT_S)
        if not ready:
            remove_placement_group(group)
            raise NotAvailableError(f"the Ray cluster at {address!r} did not offer {nodes} node(s) with {bundle} "
                                    f"each within {READY_TIMEOUT_S:.0f} s (ray status shows what it has)")
        agent_cls = ray.remote(num_cpus=1, num_gpus=per_node if backend == "cuda" else 0)(NodeAgent)
        agents = [agent_cls.options(scheduling_strategy=PlacementGroupSchedulingStrategy(group, i)).remote()
                  for i in range(nodes)]
        addr, port = ray.get(agents[0].address.remote())
        pending = {agents[i].run.remote(cfg, plan, backend, nodes, i, addr, port): i for i in range(nodes)}
        result = None
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            node = pending.pop(done[0])
            outcome = ray.get(done[0])
            if outcome[0] == "error":
                for agent in agents:  # the others' ranks lose their peers: stop them now
                    ray.kill(agent)
                raise RankFailedError(outcome[1], int(outcome[2]))
            if node == 0:
                result = outcome[1]
        remove_placement_group(group)
        return result
    finally:
        if started:
            ray.shutdown()
