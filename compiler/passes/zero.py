"""Pass `apply_zero`: ZeRO partitioning. The plan describes one rank of a data-parallel world.

* Level 1 (always, when world > 1): optimizer states and master weights are sharded. The optimizer
  pass (which runs after this one) reads `graph.meta["zero"]` and creates them at 1/world size; each
  rank updates its slice of every replicated weight and an `all_gather` re-replicates it.
* Level 2 or `shard_gradients`: every weight gradient is written by the backward pass into a
  transient full-size buffer and `reduce_scatter`-ed into a persistent 1/world shard (accumulating
  over micro-steps). Otherwise gradients are `all_reduce`-d in place (on the last micro-step).
* Level 3 or `shard_weights`: weights (base, trainable, quantized) are stored as 1/world shards; an
  `all_gather` into a transient full buffer precedes each run of same-layer uses in each phase,
  issued one group early (prefetch, as for host loads) unless its source is written in between.
  An input an op reads only for its shape (`attrs["shape_only_inputs"]`: a `qlinear`'s weight) is not
  gathered. fp8 amax histories stay whole on every rank (their quantize op updates them in place).
  `persistent_quants`: a cached quantization reads the gathered full weight (every rank computes the same
  scale and amax history) and keeps its rank's rows of the result (`attrs["keep_rank_rows"]`) in the
  persistent quantized shard, which the GEMMs gather like any weight; the gather of the full weight serves
  only the cached quantization, so it is cached with it (`offload.cache_transfers`).

Shards split dimension 0 (rounded up), so per-rank bytes are exactly 1/world when it divides.
`offload_grads` is applied here, to the gradients this pass leaves persistent. The collective options
(`use_all_to_all_reduce`, `memcpy_all_gather`, `memcpy_send_recv`) become attrs of the comm ops.
"""

from __future__ import annotations

from typing import Any

from surogate.compiler.ir import Graph, GraphError, Op, Role, Space, Tensor
from surogate.compiler.passes.offload import (
    OpInserter,
    _layer_runs,
    _place_loads,
    _replace,
    cache_transfers,
    offload_to_host,
)
from surogate.compiler.passes.precision import is_amax_history
from surogate.errors import UserError

WEIGHT_ROLES = (Role.FROZEN_WEIGHT, Role.TRAINABLE_WEIGHT, Role.QUANT_WEIGHT, Role.QUANT_SCALE)


def world_size(cfg: Any) -> tuple[int, list[str]]:
    """Ranks in the world (num_nodes x gpus per node; data-parallel x sequence-parallel) and notes on how it was
    resolved."""
    notes: list[str] = []
    gpus = getattr(cfg, "gpus", 1)
    dist = getattr(cfg, "distributed", None)
    nodes = max(1, getattr(dist, "num_nodes", 1) or 1)
    per_node = getattr(dist, "gpus_per_node", 0) or gpus
    if per_node == 0:
        detected = _detected_gpus()
        if detected == 0:
            per_node = 1
            notes.append("gpus: 0 means all available GPUs; none detected here, so the plan assumes 1 GPU per node")
        else:
            per_node = detected
            notes.append(f"gpus: 0 means all available GPUs; {detected} detected")
    return nodes * per_node, notes


def _detected_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - no torch / broken driver means no GPU to plan for
        return 0


def shard_shape(shape: tuple[int, ...], world: int) -> tuple[int, ...]:
    """Shape of one rank's shard: dimension 0 split `world` ways, rounded up."""
    if world <= 1 or not shape:
        return tuple(shape)
    return (-(-shape[0] // world), *shape[1:])


def _shard_tensor(graph: Graph, name: str, world: int) -> None:
    t = graph.tensors[name]
    attrs = {**t.attrs, "full_shape": list(t.shape), "shard": {"world": world, "dim": 0}}
    graph.update_tensor(name, shape=shard_shape(t.shape, world), attrs=attrs)


def shard_gradients(graph: Graph, world: int) -> list[str]:
    """Reduce-scatter each weight gradient into a persistent 1/world shard. Returns the shard names."""
    ins = OpInserter(graph)
    shards = []
    for g in [t for t in graph.tensors.values() if t.role is Role.GRADIENT and not t.attrs.get("transient")]:
        writers = graph.producers(g.name)
        if not writers:
            continue
        shard = f"{g.name}@shard"
        attrs = {**g.attrs, "full_shape": list(g.shape), "shard": {"world": world, "dim": 0}}
        graph.add_tensor(Tensor(shard, shard_shape(g.shape, world), g.dtype, Role.GRADIENT, g.space, g.layer, attrs=attrs))
        graph.update_tensor(g.name, attrs={**g.attrs, "transient": True, "sharded_into": shard})
        ins.after(
            writers[-1],
            Op(ins.fresh(f"reduce_scatter:{g.name}#"), "reduce_scatter", [g.name], [shard],
               attrs={"world": world, "accumulate": True}, phase="comm", layer=g.layer),
        )
        shards.append(shard)
    ins.commit()
    return shards


def all_reduce_gradients(graph: Graph, world: int) -> int:
    """Average replicated gradients across ranks after their last write (on the last micro-step)."""
    ins = OpInserter(graph)
    n = 0
    for g in [t for t in graph.tensors.values() if t.role is Role.GRADIENT and not t.attrs.get("transient")]:
        writers = graph.producers(g.name)
        if not writers:
            continue
        ins.after(
            writers[-1],
            Op(ins.fresh(f"all_reduce:{g.name}#"), "all_reduce", [g.name], [g.name],
               attrs={"world": world, "op": "avg", "when": "last_micro_step"}, phase="comm", layer=g.layer),
        )
        n += 1
    ins.commit()
    return n


def shard_weights(graph: Graph, world: int) -> list[str]:
    """Store weights as 1/world shards, all-gathered into transient full buffers before use."""
    weights = [t.name for t in graph.tensors.values()
               if t.role in WEIGHT_ROLES and graph.consumers(t.name) and not is_amax_history(t)]
    # Staging copies of offloaded weights hold the shard too; gathering happens after the h2d copy.
    staged: dict[str, list[str]] = {}
    for t in graph.tensors.values():
        if t.attrs.get("staging_of") in weights:
            staged.setdefault(t.attrs["staging_of"], []).append(t.name)
    runs = _layer_runs(graph, transfers_split=False)  # host loads placed one group early split no gather group
    pos = {n: i for i, n in enumerate(graph.order)}
    ins = OpInserter(graph)
    loads: list[tuple[str, Op, int]] = []
    for w in weights:
        full = graph.tensors[w]
        for name in (w, *staged.get(w, ())):
            _shard_tensor(graph, name, world)
        for src in (w, *staged.get(w, ())):
            current, key = None, None
            for c in graph.consumers(src):
                op = graph.op(c)
                if op.phase in ("copy", "optimizer", "comm") or _reads_shape_only(op, src):
                    continue
                k = (op.phase, runs[c])
                if current is None or k != key:
                    current, gather = _gathered(graph, ins, full, src, op)
                    written = max((pos[p] for p in graph.producers(src) if pos[p] < pos[c]), default=-1)
                    loads.append((c, gather, written))
                    key = k
                _replace(op.inputs, src, current)
    _place_loads(graph, ins, loads, pos)  # prefetch each gather one group early, like host loads
    ins.commit()
    _keep_rank_rows(graph, set(weights) | {s for names in staged.values() for s in names})
    return weights


def _reads_shape_only(op: Op, name: str) -> bool:
    """Whether `op` reads tensor `name` only for its shape (then it needs no gathered copy)."""
    shape_only = op.attrs.get("shape_only_inputs") or ()
    places = [i for i, n in enumerate(op.inputs) if n == name]
    return bool(places) and all(i in shape_only for i in places)


def _keep_rank_rows(graph: Graph, sharded: set[str]) -> None:
    """Mark the compute ops that write a sharded weight (a cached quantization writing its persistent shard):
    they compute the full tensor from gathered inputs and keep this rank's rows. Only the quantize kernel can."""
    for op in graph.ops():
        if op.phase in ("copy", "optimizer", "comm") or not sharded.intersection(op.outputs):
            continue
        if op.kind != "quantize":
            raise GraphError(f"op {op.name!r} ({op.kind}) writes a sharded weight; no kernel of that kind keeps "
                             "its rank's rows")
        op.attrs["keep_rank_rows"] = graph.meta["zero"]["world"]


def _gathered(graph: Graph, ins: OpInserter, full: Tensor, src: str, op: Op) -> tuple[str, Op]:
    k = 0
    while f"{full.name}@gather{k}" in graph.tensors:
        k += 1
    name = f"{full.name}@gather{k}"
    attrs = {"transient": True, "gathered_of": full.name}
    graph.add_tensor(Tensor(name, full.shape, full.dtype, full.role, Space.DEVICE, op.layer, attrs=attrs))
    gather = Op(ins.fresh(f"all_gather:{full.name}#"), "all_gather", [src], [name],
                attrs={"world": graph.meta["zero"]["world"]}, phase="comm", layer=op.layer)
    return name, gather


def annotate_comm(graph: Graph, cfg: Any) -> None:
    """Carry the collective-implementation options to the comm ops that use them."""
    a2a = bool(getattr(cfg, "use_all_to_all_reduce", False))
    memcpy_gather = bool(getattr(cfg, "memcpy_all_gather", False))
    memcpy_sr = bool(getattr(cfg, "memcpy_send_recv", False))
    for op in graph.ops():
        if op.phase != "comm":
            continue
        if op.kind == "all_gather":
            op.attrs.setdefault("memcpy", memcpy_gather)
        elif op.kind in ("all_reduce", "reduce_scatter"):
            op.attrs.setdefault("all_to_all", a2a)
            op.attrs.setdefault("memcpy_send_recv", memcpy_sr)


def apply_zero(graph: Graph, cfg: Any) -> Graph:
    """Partition optimizer states / gradients / weights per the ZeRO options; record `meta["zero"]`."""
    world, notes = world_size(cfg)
    level = int(getattr(cfg, "zero_level", 1) or 1)
    info = {
        "world": world,
        "level": level,
        "optimizer": world > 1,
        "gradients": world > 1 and (level >= 2 or bool(getattr(cfg, "shard_gradients", False))),
        "weights": world > 1 and (level >= 3 or bool(getattr(cfg, "shard_weights", False))),
    }
    graph.meta["zero"] = info
    sp = int(graph.meta.get("sequence_parallel", 1) or 1)
    if world % sp:  # (the schema checks it when the GPU count is given; `gpus: 0` resolves it only here)
        raise UserError(f"sequence_parallel_size: {sp} must divide the number of ranks ({world})")
    graph.meta.setdefault("notes", []).extend(notes)
    nodes = max(1, getattr(getattr(cfg, "distributed", None), "num_nodes", 1) or 1)
    if sp > world // nodes:  # groups are consecutive ranks: one node's GPUs, unless a group is larger than a node
        graph.meta["notes"].append(f"sequence_parallel_size: a group of {sp} ranks spans {sp * nodes // world} nodes "
                                   f"({world // nodes} GPUs each): its all-to-alls around every attention cross the "
                                   "network; a group within one node keeps them on the node's links")
    if world == 1 and (level > 1 or getattr(cfg, "shard_weights", False) or getattr(cfg, "shard_gradients", False)):
        graph.meta["notes"].append("ZeRO sharding has no effect with a single rank")
    if info["weights"]:
        shard_weights(graph, world)
        if graph.meta.get("offload", {}).get("persistent_quants"):
            cache_transfers(graph)  # the gathers that only feed a cached quantization
    if info["gradients"]:
        shard_gradients(graph, world)
    elif world > 1:
        all_reduce_gradients(graph, world)
    if getattr(cfg, "offload_grads", False):
        grads = [t.name for t in graph.tensors.values() if t.role is Role.GRADIENT and not t.attrs.get("transient")]
        offload_to_host(graph, grads, write_combined=bool(getattr(cfg, "use_write_combined", False)))
    annotate_comm(graph, cfg)
    return graph
