"""Pass `apply_offload`: move tensor categories to pinned host memory, with copy ops and device staging.

Two ways a tensor goes to the host:

* `offload_to_host` moves the tensor itself (master weights, optimizer states, gradients, quantized
  weights). Every device op that touches it then works on a short-lived device *staging* tensor
  (role TEMPORARY, `attrs["staging_of"]`), filled by a `copy_h2d` op before the op and written back by
  a `copy_d2h` op after it. Staging tensors are ordinary transient tensors, so buffer assignment
  reuses their memory: the device pays for the largest staged tensor, not for the category.
* `offload_activation` keeps the forward tensor on the device (the forward pass still reads it there)
  but saves it to a host copy right after it is written; backward readers read a staging copy that is
  loaded just before them. With recompute (only per-layer checkpoints saved), this makes device
  activation memory independent of the number of layers.

`persistent_quants` (`mark_persistent_quants`) keeps one persistent quantized copy per weight, made by the
weight's forward quantize op, which the runtime runs only when the weight changed (`attrs["cached"]`); with
`offload_quants` that copy is a host tensor like the other quantized weights (amax histories stay on the
device: their quantize op updates them in place), and the store after a cached quantization is cached with it.

This pass handles the categories that exist when it runs (saved residuals, quantized weights, master
weights made by the precision pass) and records every offload flag in `graph.meta["offload"]`; the
ZeRO pass offloads the gradients it shards, and the optimizer pass the states and masters it creates,
through the same helpers.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import networkx as nx

from surogate.compiler.ir import Graph, GraphError, Op, Role, Space, Tensor
from surogate.compiler.passes.precision import is_amax_history

OFFLOAD_FLAGS = (
    "offload_residual",
    "offload_master",
    "offload_quants",
    "offload_optimizer",
    "offload_grads",
    "persistent_quants",
    "use_zero_copy",
    "use_write_combined",
)


class OpInserter:
    """Queue new ops before / after existing ones and splice them into the program in one O(n) pass."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self._before: dict[str, list[Op]] = defaultdict(list)
        self._after: dict[str, list[Op]] = defaultdict(list)
        self._end: list[Op] = []
        self._names: set[str] = set()
        self._reserved: set[str] = set()

    def _check(self, op: Op) -> None:
        if op.name in self.graph.dag or op.name in self._names:
            raise GraphError(f"op {op.name!r} defined twice")
        for t in (*op.inputs, *op.outputs):
            if t not in self.graph.tensors:
                raise GraphError(f"op {op.name!r} uses unknown tensor {t!r}")
        self._names.add(op.name)

    def fresh(self, base: str) -> str:
        """An op name starting with `base` not used by the graph or by a queued op."""
        k = 0
        while f"{base}{k}" in self.graph.dag or f"{base}{k}" in self._names or f"{base}{k}" in self._reserved:
            k += 1
        self._reserved.add(f"{base}{k}")  # the op may be queued later
        return f"{base}{k}"

    def before(self, anchor: str, op: Op) -> Op:
        self._check(op)
        self._before[anchor].append(op)
        return op

    def after(self, anchor: str, op: Op) -> Op:
        self._check(op)
        self._after[anchor].append(op)
        return op

    def append(self, op: Op) -> Op:
        self._check(op)
        self._end.append(op)
        return op

    def commit(self) -> None:
        """Add the queued ops to the graph, rebuild the order and the tensor -> op indices.

        The DAG's edges are left stale (rebuilding them is the slow part on 64-layer models); the schedule
        pass rebuilds them once, after every pass that inserts ops.
        """
        g = self.graph
        queued = [*self._end]
        for ops in (*self._before.values(), *self._after.values()):
            queued.extend(ops)
        for op in queued:
            g.dag.add_node(op.name, op=op)
        order: list[str] = []
        for n in g.order:
            order.extend(o.name for o in self._before.get(n, ()))
            order.append(n)
            order.extend(o.name for o in self._after.get(n, ()))
        order.extend(o.name for o in self._end)
        g.order = order
        rebuild_edges(g, edges=False)
        self._before.clear()
        self._after.clear()
        self._end.clear()


def rebuild_edges(g: Graph, edges: bool = True) -> None:
    """Rebuild the tensor -> op indices and (unless `edges=False`) the DAG's edges, in bulk.

    Unlike `Graph.rewire()`, a reader gets an edge from the *last* writer of each tensor it reads, not
    from every earlier writer: the same dependencies for scheduling (writers of an accumulated tensor
    are ordered by program order anyway), without the quadratic edge count of a chunked LM head
    accumulating into one tensor (49k edges for one Qwen3-32B tensor), which dominated planning time.
    """
    writers: dict[str, list[str]] = {}
    readers: dict[str, list[str]] = {}
    found = []
    for n in g.order:
        op = g.dag.nodes[n]["op"]
        for t in op.inputs:
            if edges and t in writers:  # n's own outputs are indexed after its inputs: never a self-edge
                found.append((writers[t][-1], n, {"tensor": t}))
            readers.setdefault(t, []).append(n)
        for t in op.outputs:
            writers.setdefault(t, []).append(n)
    g._writers, g._readers = writers, readers
    if edges:
        dag = nx.DiGraph()
        dag.add_nodes_from(g.dag.nodes(data=True))
        dag.add_edges_from(found)
        g.dag = dag


def _replace(names: list[str], old: str, new: str) -> None:
    for i, n in enumerate(names):
        if n == old:
            names[i] = new


def _fresh(graph: Graph, base: str) -> str:
    k = 0
    while f"{base}{k}" in graph.tensors or f"{base}{k}" in graph.dag:
        k += 1
    return f"{base}{k}"


def _staging(graph: Graph, of: str, layer: int | None) -> str:
    src = graph.tensors[of]
    name = _fresh(graph, f"{of}@stage")
    graph.add_tensor(
        Tensor(name, src.shape, src.dtype, Role.TEMPORARY, Space.DEVICE, layer=layer, attrs={"staging_of": of})
    )
    return name


def _layer_runs(graph: Graph, transfers_split: bool = True) -> dict[str, int]:
    """Op name -> index of its run of consecutive same-layer ops (to keep staging copies layer-local).

    `transfers_split=False`: copies and collectives do not end a run (a load prefetched into the previous layer's
    ops belongs to the next layer; counted as a break, it would split that layer's readers in two groups)."""
    runs: dict[str, int] = {}
    run, prev = 0, object()
    for n in graph.order:
        op = graph.op(n)
        layer = op.layer
        if not transfers_split and op.phase in ("copy", "comm"):
            runs[n] = run
            continue
        if layer != prev:
            run += 1
            prev = layer
        runs[n] = run
    return runs


def _copy(ins: OpInserter, kind: str, src: str, dst: str, layer: int | None, **attrs: Any) -> Op:
    return Op(ins.fresh(f"{kind}:{src}#"), kind, [src], [dst], attrs=attrs, phase="copy", layer=layer)


def offload_to_host(
    graph: Graph, names: Iterable[str], *, zero_copy: bool = False, write_combined: bool = False
) -> list[str]:
    """Move tensors to pinned host memory; ops that touch them go through device staging copies.

    With `zero_copy` the device ops read and write host memory directly (no copies, no staging).
    Returns the names moved.
    """
    moved = move_to_host(graph, names, write_combined=write_combined)
    stage_host_accesses(graph, moved, zero_copy=zero_copy)
    return moved


def move_to_host(graph: Graph, names: Iterable[str], *, write_combined: bool = False) -> list[str]:
    """Put tensors in pinned host memory without touching ops (callers stage the accesses)."""
    moved = [n for n in dict.fromkeys(names) if graph.tensors[n].space is Space.DEVICE]
    for n in moved:
        t = graph.tensors[n]
        extra = {"offloaded": True, "write_combined": True} if write_combined else {"offloaded": True}
        graph.update_tensor(n, space=Space.HOST, attrs={**t.attrs, **extra})
    return moved


def write_combined_host(tensors: dict[str, Tensor]) -> bool:
    """Whether the host arena is write-combined: `use_write_combined` marks every tensor the offload helpers move
    to the host (the arena is one allocation, so the mark is the arena's)."""
    return any(t.space is Space.HOST and t.attrs.get("write_combined") for t in tensors.values())


def stage_host_accesses(
    graph: Graph, names: Iterable[str], *, ops: Iterable[str] | None = None, zero_copy: bool = False
) -> None:
    """Give device ops that touch host tensors `names` staging copies (all ops, or only `ops`).

    A reader gets a `copy_h2d` into a staging tensor before it (shared by consecutive readers in the
    same phase and layer); a writer writes a staging tensor that a `copy_d2h` stores back after it
    (accumulating into gradients). With `zero_copy` the ops are only marked to access host memory.
    """
    targets = set(names)
    selected = set(ops) if ops is not None else None
    if not targets:
        return
    if zero_copy:
        for op in graph.ops():
            if selected is not None and op.name not in selected:
                continue
            if targets.intersection(op.inputs) or targets.intersection(op.outputs):
                op.attrs["zero_copy"] = True
        return
    runs = _layer_runs(graph)
    pos = {n: i for i, n in enumerate(graph.order)}
    ins = OpInserter(graph)
    loads: list[tuple[str, Op, int]] = []
    last_write: dict[str, int] = {}
    # (tensor, phase, layer run) -> staging tensor holding a fresh device copy
    read_stage: dict[tuple[str, str, int], str] = {}
    for opname in list(graph.order):
        op = graph.op(opname)
        if op.phase == "copy" or (selected is not None and opname not in selected):
            for t in op.outputs:  # not staged here, but a later load must not move above this write
                if t in targets:
                    last_write[t] = pos[opname]
            continue
        for t in dict.fromkeys((*op.inputs, *op.outputs)):
            if t not in targets:
                continue
            reads, writes = t in op.inputs, t in op.outputs
            if writes:
                s = _staging(graph, t, op.layer)
                if reads:
                    loads.append((opname, _copy(ins, "copy_h2d", t, s, op.layer), last_write.get(t, -1)))
                _replace(op.inputs, t, s)
                _replace(op.outputs, t, s)
                last_write[t] = pos[opname]
                accumulate = not reads and graph.tensors[t].role is Role.GRADIENT
                ins.after(opname, _copy(ins, "copy_d2h", s, t, op.layer, accumulate=accumulate))
                for key in [k for k in read_stage if k[0] == t]:
                    del read_stage[key]
            else:
                key = (t, op.phase, runs[opname])
                s = read_stage.get(key)
                if s is None:
                    s = _staging(graph, t, op.layer)
                    loads.append((opname, _copy(ins, "copy_h2d", t, s, op.layer), last_write.get(t, -1)))
                    read_stage[key] = s
                _replace(op.inputs, t, s)
    _place_loads(graph, ins, loads, pos)
    ins.commit()


def _place_loads(graph: Graph, ins: OpInserter, loads: list[tuple[str, Op, int]], pos: dict[str, int]) -> None:
    """Queue host -> device loads one group early (double buffering), where that is safe.

    `loads` holds (anchor op, copy op, position of the source's last write before the anchor). A load is
    placed before the previous distinct anchor of the same phase, so the transfer of the next group
    overlaps the compute of the current one; the plan then holds two staging groups at once, which is
    what a double-buffered runtime allocates. It stays at its anchor when the previous anchor is not
    after the source's last write (the copy would read a stale value) or there is none.
    """
    anchors: dict[str, list[str]] = {}
    for anchor in sorted({a for a, _, _ in loads}, key=pos.__getitem__):
        anchors.setdefault(graph.op(anchor).phase, []).append(anchor)
    previous = {a: (seq[i - 1] if i else None) for seq in anchors.values() for i, a in enumerate(seq)}
    for anchor, op, written in loads:
        early = previous[anchor]
        ins.before(early if early is not None and pos[early] > written else anchor, op)


def offload_activation(graph: Graph, names: Iterable[str], *, write_combined: bool = False) -> list[str]:
    """Save activations to host right after they are written; backward readers load them back.

    The device tensor keeps its name and serves forward readers; it dies after its last forward use.
    Returns the names of the host copies.
    """
    runs = _layer_runs(graph)
    pos = {n: i for i, n in enumerate(graph.order)}
    ins = OpInserter(graph)
    loads: list[tuple[str, Op, int]] = []
    hosts: list[str] = []
    for name in dict.fromkeys(names):
        t = graph.tensors[name]
        writers = graph.producers(name)
        late = [c for c in graph.consumers(name) if graph.op(c).phase == "backward"]
        if not writers or not late:
            continue
        host = _fresh(graph, f"{name}@host")
        attrs = {"offloaded": True, "host_copy_of": name}
        if write_combined:
            attrs["write_combined"] = True
        graph.add_tensor(Tensor(host, t.shape, t.dtype, t.role, Space.HOST, layer=t.layer, attrs=attrs))
        hosts.append(host)
        ins.after(writers[-1], _copy(ins, "copy_d2h", name, host, t.layer))
        stage, stage_key = None, None
        for c in late:
            op = graph.op(c)
            key = (op.phase, runs[c])
            if stage is None or key != stage_key:
                stage = _staging(graph, host, op.layer)
                graph.tensors[stage].attrs["staging_of"] = host
                loads.append((c, _copy(ins, "copy_h2d", host, stage, op.layer), pos[writers[-1]]))
                stage_key = key
            _replace(op.inputs, name, stage)
    _place_loads(graph, ins, loads, pos)
    ins.commit()
    return hosts


def residual_tensors(graph: Graph) -> list[str]:
    """Saved activations to stream to the host under `offload_residual`.

    Tensors marked `attrs["residual"]` by the graph builder / recompute pass; if none is marked, every
    per-layer activation written in the forward pass and read in the backward pass.
    """
    marked = [t.name for t in graph.tensors.values() if t.role is Role.ACTIVATION and t.attrs.get("residual")]
    if marked:
        return marked
    saved = []
    for t in graph.tensors.values():
        if t.role is not Role.ACTIVATION or t.layer is None:
            continue
        writers = graph.producers(t.name)
        if writers and all(graph.op(w).phase == "forward" for w in writers):
            if any(graph.op(c).phase == "backward" for c in graph.consumers(t.name)):
                saved.append(t.name)
    return saved


WEIGHT_SOURCE_ROLES = (Role.FROZEN_WEIGHT, Role.TRAINABLE_WEIGHT)
TRANSFER_KINDS = frozenset({"copy_h2d", "copy_d2h", "all_gather"})


def mark_persistent_quants(graph: Graph) -> list[str]:
    """`persistent_quants`: keep one quantized copy of each weight instead of re-quantizing it every micro-step.

    The forward quantize op of each weight becomes `cached` (`attrs["cache_key"]`: the weight; the runtime runs it
    only when that weight changed since it last ran) and its outputs persistent (role QUANT_WEIGHT /
    QUANT_SCALE). Its recompute (`rc:`) and backward re-emitted (`redo_of`) copies are dropped: their readers read
    the forward's copy, so the plan holds one copy per weight, not three. The copies never advanced the amax
    history (`update_history: False`), so dropping them changes no value. A QLoRA weight under a quantized recipe
    is quantized from its dequantized copy: see `_cache_frozen_dequants`. Returns the persistent tensors.
    """
    primaries = _weight_quantizations(graph)
    kept = []
    for name, weight in primaries.items():
        op = graph.op(name)
        op.attrs["cached"] = True
        op.attrs["cache_key"] = weight
        for o in op.outputs:
            t = graph.tensors[o]
            role = Role.QUANT_SCALE if (t.dtype == "fp32" or "scale" in t.attrs) else Role.QUANT_WEIGHT
            if t.role in (Role.QUANT_WEIGHT, Role.QUANT_SCALE):
                role = t.role
            graph.update_tensor(o, role=role, attrs={**t.attrs, "persistent": True})
            kept.append(o)
    _drop_copies(graph, set(primaries))
    _cache_frozen_dequants(graph, [graph.op(n) for n, w in primaries.items() if graph.tensors[w].role is Role.QUANT_WEIGHT])
    return kept


def _weight_quantizations(graph: Graph) -> dict[str, str]:
    """Forward quantize op name -> the weight it quantizes (re-emitted copies excluded): a weight it reads, or the
    stored quantized weight (QLoRA) whose forward dequantization it reads."""
    found: dict[str, str] = {}
    for op in graph.ops():
        if not op.kind.startswith("quant") or _is_copy(op):
            continue
        weight = next((i for i in op.inputs if graph.tensors[i].role in WEIGHT_SOURCE_ROLES), None)
        if weight is None and (dequant := _dequant_of(graph, op.inputs[0])) is not None:
            weight = dequant.inputs[0]
        if weight is not None:
            found[op.name] = weight
    return found


def _is_copy(op: Op) -> bool:
    """A recompute (`rc:`) or backward re-emitted copy of a forward op."""
    return bool(op.attrs.get("recompute") or op.attrs.get("redo"))


def _copy_of(op: Op) -> str | None:
    """The forward op `op` re-emits, if it is a recompute or backward copy."""
    if op.attrs.get("redo_of"):
        return op.attrs["redo_of"]
    return op.name.removeprefix("rc:") if op.attrs.get("recompute") and op.name.startswith("rc:") else None


def _dequant_of(graph: Graph, name: str) -> Op | None:
    """The forward `dequant` op that alone writes `name` from a stored quantized weight (QLoRA), if there is one."""
    writers = graph.producers(name)
    if len(writers) != 1:
        return None
    op = graph.op(writers[0])
    if op.kind != "dequant" or op.phase != "forward" or _is_copy(op):
        return None
    return op if graph.tensors[op.inputs[0]].role is Role.QUANT_WEIGHT else None


def _drop_copies(graph: Graph, originals: set[str]) -> None:
    """Remove the recompute / backward copies of the `originals` ops; their readers read the originals' outputs."""
    rename: dict[str, str] = {}
    dropped: set[str] = set()
    for op in graph.ops():
        original = _copy_of(op)
        if original not in originals:
            continue
        if op.attrs.get("redo_of"):  # autodiff's re-emission: outputs in the original's order
            rename.update(zip(op.outputs, graph.op(original).outputs, strict=True))
        else:
            rename.update((o, graph.tensors[o].attrs["recomputed_from"]) for o in op.outputs)
        dropped.add(op.name)
    if dropped:
        for op in graph.ops():
            op.inputs[:] = [rename.get(i, i) for i in op.inputs]
        _remove_ops(graph, dropped)


def _remove_ops(graph: Graph, names: set[str]) -> None:
    """Remove ops and their outputs (nothing reads them any more) in one pass."""
    for name in names:
        for t in graph.op(name).outputs:
            graph.remove_tensor(t)
        graph.dag.remove_node(name)
    graph.order = [n for n in graph.order if n not in names]
    rebuild_edges(graph, edges=False)  # the schedule pass rebuilds the DAG's edges


def _cache_frozen_dequants(graph: Graph, quants: list[Op]) -> None:
    """QLoRA under a quantized recipe: each of the cached `quants` reads the dequantization of a frozen stored weight.

    The GEMMs that read that dequantized weight (or a recompute / backward copy of it) only for its shape
    (`shape_only_inputs`) read the persistent quantized copy instead; the dequant copies nothing reads any more
    are dropped; each forward dequant is then cached with its quantization (same key) when only cached ops read
    its output, so neither runs again while the stored weight is unchanged. (One pass over the program for all.)
    """
    by_dequant = {d.name: (d, q) for q in quants if (d := _dequant_of(graph, q.inputs[0])) is not None}
    if not by_dequant:
        return
    copies = [op for op in graph.ops() if _copy_of(op) in by_dequant]
    stand_in = {d.outputs[0]: q.outputs[0] for d, q in by_dequant.values()}  # dequantized -> its fp8 copy
    stand_in.update((o, stand_in[by_dequant[_copy_of(op)][0].outputs[0]]) for op in copies for o in op.outputs)
    for op in graph.ops():
        for i in op.attrs.get("shape_only_inputs") or ():
            if i < len(op.inputs) and op.inputs[i] in stand_in:
                op.inputs[i] = stand_in[op.inputs[i]]  # a tensor of the weight's shape the kernel does not read
    rebuild_edges(graph, edges=False)
    _remove_ops(graph, {op.name for op in copies if not any(graph.consumers(o) for o in op.outputs)})
    for dequant, quant in by_dequant.values():
        if all(graph.op(c).attrs.get("cached") for c in graph.consumers(dequant.outputs[0])):
            dequant.attrs["cached"] = True
            dequant.attrs["cache_key"] = quant.attrs["cache_key"]


def cache_transfers(graph: Graph) -> int:
    """Mark the copies and gathers that only serve cached ops (`mark_persistent_quants`) as cached with them.

    A load or gather whose transient output only cached ops of one key read (the all-gather of a sharded weight
    that feeds its quantization), and a store whose transient input only such ops write (the device -> host copy
    of an offloaded quantization), run when those ops run and are skipped with them. Returns how many were marked.
    """
    marked, changed = 0, True
    while changed:  # a chain (load -> gather -> quantize) is marked from the quantize back
        changed = False
        for op in graph.ops():
            if op.kind not in TRANSFER_KINDS or op.attrs.get("cached"):
                continue
            key = _served_key(graph, op)
            if key is not None:
                op.attrs["cached"] = True
                op.attrs["cache_key"] = key
                marked += 1
                changed = True
    return marked


def _served_key(graph: Graph, op: Op) -> str | None:
    """The cache key of the cached ops that alone read `op`'s outputs or alone write its inputs, if any."""
    def key_of(names: list[str], neighbours: Any) -> str | None:
        keys = set()
        for t in names:
            if graph.tensors[t].role is not Role.TEMPORARY and not graph.tensors[t].attrs.get("transient"):
                return None  # a persistent end (the host copy, the shard) stays valid on its own
            ops = [graph.op(n) for n in neighbours(t) if n != op.name]
            if not ops or not all(o.attrs.get("cached") for o in ops):
                return None
            keys.update(o.attrs["cache_key"] for o in ops)
        return keys.pop() if len(keys) == 1 else None

    return key_of(op.outputs, graph.consumers) or key_of(op.inputs, graph.producers)


def expert_quants(graph: Graph) -> list[str]:
    """Quantized MoE expert weights (`attrs["module"] == "experts"`) and their scales."""
    names: list[str] = []
    for t in graph.tensors.values():
        if t.role is Role.QUANT_WEIGHT and t.attrs.get("module") == "experts":
            names += [t.name, *(s for s in t.attrs.get("scales", ()) if s in graph.tensors)]
    return names


def apply_offload(graph: Graph, cfg: Any) -> Graph:
    """Offload residual checkpoints, quantized weights (all, or MoE experts under `qlora_offload_experts`)
    and existing master weights per the config."""
    flags = {f: bool(getattr(cfg, f, False)) for f in OFFLOAD_FLAGS}
    graph.meta["offload"] = flags
    wc = flags["use_write_combined"]
    if flags["persistent_quants"] and not mark_persistent_quants(graph):
        graph.meta.setdefault("notes", []).append(
            "persistent_quants: no weight is quantized per step in this plan (QLoRA base weights are stored "
            "quantized already; only a quantized `recipe` quantizes weights every step): nothing to keep"
            + ("; offload_quants (which requires it) still places the stored quantized weights in pinned host "
               "memory" if flags["offload_quants"] else ""))
    if flags["offload_residual"]:
        offload_activation(graph, residual_tensors(graph), write_combined=wc)
    if flags["offload_quants"]:
        # amax histories stay on the device: their quantize op advances them in place (see is_amax_history)
        quants = [t.name for t in graph.tensors.values()
                  if t.role in (Role.QUANT_WEIGHT, Role.QUANT_SCALE) and not is_amax_history(t)]
        offload_to_host(graph, quants, write_combined=wc)
        if flags["persistent_quants"]:
            cache_transfers(graph)
    if getattr(cfg, "qlora_offload_experts", False):
        experts = expert_quants(graph)
        if not experts:
            graph.meta.setdefault("notes", []).append(
                "qlora_offload_experts: no quantized MoE expert weights in this model; nothing offloaded")
        offload_to_host(graph, experts, write_combined=wc)
    if flags["offload_master"]:
        masters = [t.name for t in graph.tensors.values() if t.role is Role.MASTER_WEIGHT]
        offload_to_host(graph, masters, zero_copy=flags["use_zero_copy"], write_combined=wc)
    return graph
