"""Pass `group_lora_projections`: one GEMM for the LoRA projections that share an input.

q/k/v (and gate/up) read the same normalised activation x, so their adapters run three (two) skinny GEMMs of
the same x each pass: `h_i = x @ A_i^T` in the forward, `dx += dh_i @ A_i` and `dA_i += dh_i^T @ x` in the backward
(at rank 16 these are latency-bound launches that each read or read-modify-write a whole [tokens, hidden] tensor).
Stacking the group's A weights ([A_q; A_k; A_v], adjacent in the arena) turns each triple into one GEMM:

    h_G = x @ [A_q; A_k; A_v]^T          (linear_stacked;  h_q, h_k, h_v are column views of h_G [.., 3r])
    dx += dh_G @ [A_q; A_k; A_v]         (linear_stacked_bwd_data; dh_q, dh_k, dh_v column views of dh_G)
    [dA_q; dA_k; dA_v] += dh_G^T @ x     (linear_stacked_bwd_weight; the gradients adjacent in the arena)

Every other op is unchanged: the up-projections (`lora_merge`, the B gradients and dh_i = s * dy_i @ B_i) read or
write their column of h_G / dh_G in place. The forward values are the same products; the data gradient sums the
group's K = 3r terms inside one GEMM (fp32 accumulation, one rounding into dx) where the unstacked program
rounded after each adapter's accumulation: bf16-level differences, not bits.

Groups need what makes the stacking exact and cheap: no dropout (each adapter would read its own x'), adapters in
x's dtype (bf16 LoRA: no mixed-dtype split routes), A weights and their gradients persistent device tensors that
only these ops, the optimizer and ZeRO-1's in-place collectives touch (a gradient's all-reduce, moved after the
stacked GEMM; the updated weight's all-gather), not ZeRO-2/3 shards or offload copies, and a byte size that is a
multiple of `STACK_ALIGN` so adjacent members are exactly a stacked matrix. Whatever does not fit keeps its
unstacked ops. The planner (`assign_buffers`) places each `graph.meta["stacks"]` entry contiguously; column views
carry `attrs["view"] = {"of": parent, "col": first column}` and take no memory of their own.

The frozen base weights of the same projections are stacked too (a LoRA model's: no weight gradients):
`y_G = x @ [W_q; W_k; W_v]^T` once per forward and recompute (y_q, y_k, y_v column views, read only by their
adapters' merges, whose kernel takes row-strided inputs), and for gate/up, whose output gradients swiglu_bwd
writes as column views of one [.., 2 * intermediate] tensor, `dx += [d_gate | d_up] @ [W_gate; W_up]` (K = 2 x
intermediate). q/k/v's gradients come from attention and the q/k norm kernels, which write whole tensors: their
data gradients stay three GEMMs. A full fine-tune is left alone (its projections' outputs feed kernels that
take whole tensors). `SUROGATE_FUSIONS_OFF=group_lora_projections` keeps the unstacked program (to A/B the two).
The next pass, `fold_lora_up_projection` (lora_fold.py), folds the stacked groups' merges into their base GEMMs
(the base forward GEMMs stacked here are replaced by GEMMs over [x | h_G]: one per q/k/v projection, one stacked
for gate/up).
"""

from __future__ import annotations

from typing import Any

from surogate.compiler.ir import Graph, Op, Role, Space
from surogate.compiler.passes.fusion import _on
from surogate.compiler.passes.liveness import is_persistent

ENABLED = True
STACK_ALIGN = 16  # bytes: kernels' vector loads need members starting at 16-byte boundaries
# Kinds allowed to read a column view h_i (by position of h_i among the inputs).
_H_READERS = {("lora_merge", 1), ("linear_bwd_weight", 1), ("linear", 0)}
# ... and a base projection's output y_i (in a LoRA model only its adapter's merge reads it)
_BASE_READERS = {("lora_merge", 0), ("add", 0)}  # (add: the merge unfused)
# Kinds allowed to read an output gradient dy_i that becomes a column view, and the kinds that may write it
_DY_READERS = {("linear_bwd_data", 0), ("linear_bwd_weight", 0)}
_DY_WRITERS = frozenset({"swiglu_bwd"})  # writes its outputs through row-strided views


def group_lora_projections(graph: Graph, cfg: Any, *, enabled: bool | None = None) -> Graph:
    """Stack the A weights of LoRA adapters sharing an input, and the frozen base weights of projections sharing
    one; rewrite their GEMMs into stacked ones."""
    stacks: dict[str, list[str]] = graph.meta.setdefault("stacks", {})
    grouped = based = 0
    if _on("group_lora_projections", ENABLED, enabled) and graph.meta.get("lora"):
        position = {n: i for i, n in enumerate(graph.tensors)}
        grouped = _stack_down_projections(graph, stacks, position)
        based = _stack_base_projections(graph, stacks, position)
        if grouped or based:
            graph.rewire()
    graph.meta["lora_groups"] = grouped
    graph.meta["base_groups"] = based
    return graph


def _unscaled(op: Op) -> bool:
    """The stacked ops compute the plain products (every GEMM they replace has scale 1)."""
    return float(op.attrs.get("scale", 1.0)) == 1.0


def _is_lora_a(graph: Graph, op: Op) -> bool:
    return op.attrs.get("lora") == "A"


def _is_frozen_base(graph: Graph, op: Op) -> bool:
    return "lora" not in op.attrs and graph.tensors[op.inputs[1]].role is Role.FROZEN_WEIGHT


def _ordered(members: list[Op], position: dict[str, int]) -> tuple[list[Op], list[str]]:
    members = sorted(members, key=lambda op: position[op.inputs[1]])
    return members, [op.inputs[1] for op in members]


def _stack_down_projections(graph: Graph, stacks: dict[str, list[str]], position: dict[str, int]) -> int:
    grouped = 0
    for found in _forward_groups(graph, _is_lora_a):
        members, weights = _ordered(found, position)
        grads = _weight_gradients(graph, weights)
        key = f"{weights[0].removesuffix('.weight')}+{len(weights)}"
        if grads is None or key in stacks or not _stackable(graph, weights, grads, members):
            continue
        stacks[key] = weights
        stacks[f"{key}.grad"] = [grads[w] for w in weights]
        _stack_forward(graph, members, weights)
        for rc in _recompute_groups(graph, weights, _is_lora_a, _H_READERS):
            _stack_forward(graph, rc, weights)
        _stack_backward(graph, weights, grads)
        grouped += 1
    return grouped


def _stack_base_projections(graph: Graph, stacks: dict[str, list[str]], position: dict[str, int]) -> int:
    """A LoRA model's frozen q/k/v (gate/up) weights as one stack: one forward GEMM per group (its outputs read
    only by the adapters' merges, which take column views), and where the output gradients come from one
    kernel that writes column views (swiglu_bwd: gate/up) one data-gradient GEMM with K = the summed widths."""
    based = 0
    for found in _forward_groups(graph, _is_frozen_base):
        members, weights = _ordered(found, position)
        key = f"{weights[0].removesuffix('.weight')}+{len(weights)}"
        if key in stacks or not _frozen_stackable(graph, weights, members):
            continue
        stacks[key] = weights
        _stack_forward(graph, members, weights)
        for rc in _recompute_groups(graph, weights, _is_frozen_base, _BASE_READERS):
            _stack_forward(graph, rc, weights)
        data_ops = _base_data_ops(graph, weights)
        if data_ops is not None:
            dys = [d.inputs[0] for d in data_ops]
            parent = graph.add_column_parent(f"{dys[0]}+{len(dys)}", dys)
            _emit_stacked_data(graph, data_ops, parent, weights)
        based += 1
    return based


def _forward_groups(graph: Graph, pick: Any) -> list[list[Op]]:
    """Forward `linear` ops (no bias) that `pick` selects, grouped by their shared input (two or more per group)."""
    by_input: dict[str, list[Op]] = {}
    for op in graph.ops():
        if op.kind == "linear" and len(op.inputs) == 2 and op.phase == "forward" and _unscaled(op) and pick(graph, op):
            by_input.setdefault(op.inputs[0], []).append(op)
    return [ops for ops in by_input.values() if len(ops) >= 2]


def _recompute_groups(graph: Graph, weights: list[str], pick: Any, readers: set) -> list[list[Op]]:
    """Recompute copies of a stacked group's forward GEMMs (present when recompute re-runs them), found among
    the weights' readers."""
    found: dict[str, list[Op | None]] = {}
    for k, w in enumerate(weights):
        for name in graph.consumers(w):
            op = graph.op(name)
            if op.kind == "linear" and op.phase != "forward" and len(op.inputs) == 2 and op.inputs[1] == w \
                    and _unscaled(op) and pick(graph, op):
                found.setdefault(op.inputs[0], [None] * len(weights))[k] = op
    return [ops for ops in found.values() if all(ops) and all(_out_ok(graph, o, readers) for o in ops)]  # type: ignore[misc]


def _weight_gradients(graph: Graph, weights: list[str]) -> dict[str, str] | None:
    """A weight -> its gradient tensor (the output of its single `linear_bwd_weight`), or None."""
    out: dict[str, str] = {}
    for w in weights:
        grad = graph.tensors.get(f"{w}.grad")
        if grad is None or grad.role is not Role.GRADIENT:
            return None
        out[w] = grad.name
    return out


def _stackable(graph: Graph, weights: list[str], grads: dict[str, str], ops: list[Op]) -> bool:
    x = graph.tensors[ops[0].inputs[0]]
    ws = [graph.tensors[w] for w in weights]
    gs = [graph.tensors[grads[w]] for w in weights]
    first = ws[0]
    if any(w.dtype != x.dtype or w.shape[1:] != first.shape[1:] or w.shape[0] != first.shape[0] for w in ws):
        return False
    for t in (*ws, *gs):
        if t.space is not Space.DEVICE or not is_persistent(t) or t.nbytes % STACK_ALIGN or t.dtype != x.dtype:
            return False
        if t.attrs.get("view"):
            return False
    for w, g in zip(ws, gs, strict=True):
        # (a data-parallel run's gradient all-reduce and sharded-update all-gather work on each tensor in place:
        # adjacency changes nothing for them)
        for name, allowed in ((w.name, ("linear", "linear_bwd_data", "all_gather")),
                              (g.name, ("linear_bwd_weight", "all_reduce"))):
            for o in graph.consumers(name) + graph.producers(name):
                op = graph.op(o)
                if op.phase != "optimizer" and op.kind not in allowed:
                    return False
    return all(_out_ok(graph, op, _H_READERS) for op in ops) and _backward_pairs(graph, weights, grads) is not None


def _out_ok(graph: Graph, op: Op, readers: set) -> bool:
    """The op's output is written by it alone and read only by kinds that take a column view of it."""
    y = op.outputs[0]
    if len(op.outputs) != 1 or graph.producers(y) != [op.name] or graph.tensors[y].attrs.get("view"):
        return False
    return _readers_ok(graph, y, readers)


def _readers_ok(graph: Graph, name: str, readers: set) -> bool:
    for r in graph.consumers(name):
        rop = graph.op(r)
        if not any(rop.kind == k and rop.inputs[i] == name and rop.inputs.count(name) == 1 for k, i in readers):
            return False
    return True


def _frozen_stackable(graph: Graph, weights: list[str], ops: list[Op]) -> bool:
    x = graph.tensors[ops[0].inputs[0]]
    ws = [graph.tensors[w] for w in weights]
    for t in ws:
        if (t.role is not Role.FROZEN_WEIGHT or t.space is not Space.DEVICE or not is_persistent(t)
                or t.nbytes % STACK_ALIGN or t.dtype != x.dtype or t.shape[1:] != ws[0].shape[1:]
                or t.attrs.get("view")):
            return False
        if any(graph.op(o).kind not in ("linear", "linear_bwd_data") for o in graph.consumers(t.name)):
            return False
        if graph.producers(t.name):
            return False
    return all(_out_ok(graph, op, _BASE_READERS) for op in ops)


def _base_data_ops(graph: Graph, weights: list[str]) -> list[Op] | None:
    """Per frozen weight its one linear_bwd_data, when every output gradient can be a column view of one tensor:
    written whole (no accumulation) by one op of a kind that writes views, all by the same op, read only by GEMMs;
    the same dx; nothing reading dx between the first and the last of them. None otherwise."""
    data: list[Op] = []
    for w in weights:
        ops = [graph.op(o) for o in graph.consumers(w) if graph.op(o).kind == "linear_bwd_data"]
        if len(ops) != 1 or not _unscaled(ops[0]):
            return None
        data.append(ops[0])
    writers = set()
    for d in data:
        dy = d.inputs[0]
        t = graph.tensors[dy]
        prod = graph.producers(dy)
        if len(prod) != 1 or t.attrs.get("view") or t.dtype != graph.tensors[d.inputs[1]].dtype:
            return None
        writer = graph.op(prod[0])
        if writer.kind not in _DY_WRITERS or dy in (writer.attrs.get("accumulate_into") or ()) \
                or writer.attrs.get("accumulate") or not _readers_ok(graph, dy, _DY_READERS):
            return None
        writers.add(writer.name)
    if len(writers) != 1 or len({d.outputs[0] for d in data}) != 1 or not _dx_untouched_between(graph, data):
        return None
    return data


def _dx_untouched_between(graph: Graph, data_ops: list[Op]) -> bool:
    """Nothing reads the ops' common output between the first and the last of them (the stacked op runs last)."""
    at = [_index(graph, d) for d in data_ops]
    return not any(min(at) < _index(graph, graph.op(r)) < max(at) for r in graph.consumers(data_ops[0].outputs[0]))


def _backward_pairs(graph: Graph, weights: list[str], grads: dict[str, str]) -> list[tuple[Op | None, Op]] | None:
    """Per weight, its (linear_bwd_data or None, linear_bwd_weight) reading one dh; None unless all have the
    stacked shape: one weight gradient each, data gradients for all or none (none: the input needs no gradient,
    layer 0 of a LoRA model), the same dx and x, dh written once by a non-accumulating op."""
    pairs: list[tuple[Op | None, Op]] = []
    for w in weights:
        data = [graph.op(o) for o in graph.consumers(w) if graph.op(o).kind == "linear_bwd_data"]
        # (a data-parallel all-reduce also writes the gradient, in place, after it: not a GEMM of the pair)
        wgrad = [graph.op(o) for o in graph.producers(grads[w]) if graph.op(o).kind != "all_reduce"]
        if len(data) > 1 or len(wgrad) != 1 or wgrad[0].kind != "linear_bwd_weight":
            return None
        d, g = (data[0] if data else None), wgrad[0]
        if not _unscaled(g) or (d is not None and not _unscaled(d)):
            return None
        dh = g.inputs[0]
        if len(g.outputs) != 1 or (d is not None and (d.inputs[0] != dh or d.phase != g.phase)):
            return None
        if sorted(graph.consumers(dh)) != sorted(o.name for o in (d, g) if o) or len(graph.producers(dh)) != 1:
            return None
        writer = graph.op(graph.producers(dh)[0])
        if dh in (writer.attrs.get("accumulate_into") or ()) or writer.attrs.get("accumulate"):
            return None
        if graph.tensors[dh].dtype != graph.tensors[w].dtype or graph.tensors[dh].attrs.get("view"):
            return None
        pairs.append((d, g))
    data_ops = [d for d, _ in pairs if d is not None]
    if len(data_ops) not in (0, len(pairs)) or len({g.inputs[1] for _, g in pairs}) != 1:
        return None
    if data_ops and (len({d.outputs[0] for d in data_ops}) != 1 or not _dx_untouched_between(graph, data_ops)):
        return None
    return pairs


def _stack_forward(graph: Graph, ops: list[Op], weights: list[str]) -> None:
    """Replace the group's `linear(x, W_i) -> y_i` by one `linear_stacked(x, W_1..W_n) -> y_G` (y_i its columns)."""
    hs = [op.outputs[0] for op in ops]
    parent = graph.add_column_parent(f"{hs[0]}+{len(hs)}", hs)
    first = min(ops, key=lambda o: _index(graph, o))  # where the first h_i was written: before any reader
    graph.add_op(Op(f"{first.name}+{len(ops)}", "linear_stacked", [first.inputs[0], *weights], [parent],
                    {"scale": 1.0, **({"lora": "A"} if "lora" in first.attrs else {}), "stacked": len(weights)},
                    first.phase, first.layer),
                 after=first.name)
    for op in ops:
        graph.remove_op(op.name)


def _stack_backward(graph: Graph, weights: list[str], grads: dict[str, str]) -> None:
    """Replace the n data-gradient (if any) and n weight-gradient GEMMs by one of each, where the last ran."""
    pairs = _backward_pairs(graph, weights, grads)
    assert pairs is not None  # checked by _stackable
    grad_ops = [g for _, g in pairs]
    data_ops = [d for d, _ in pairs if d is not None]
    dhs = [g.inputs[0] for g in grad_ops]
    parent = graph.add_column_parent(f"{dhs[0]}+{len(dhs)}", dhs)
    if data_ops:
        _emit_stacked_data(graph, data_ops, parent, weights)
    last = max(grad_ops, key=lambda o: _index(graph, o))
    gnames = [grads[w] for w in weights]
    stacked = graph.add_op(Op(f"{last.name}+{len(pairs)}", "linear_stacked_bwd_weight",
                              [parent, grad_ops[0].inputs[1]], gnames,
                              {"scale": 1.0, "stacked": len(weights), "accumulate_into": list(gnames)}, last.phase,
                              last.layer), after=last.name)
    for op in grad_ops:
        graph.remove_op(op.name)
    follow_all_reduces(graph, stacked)


def follow_all_reduces(graph: Graph, op: Op) -> str:
    """Move the all-reduces of `op`'s outputs (a data-parallel run reduces each gradient right after its GEMM)
    right after `op`, in their order; returns the name of the last op of the run."""
    after = op.name
    for g in op.outputs:
        for name in [n for n in graph.producers(g) if graph.op(n).kind == "all_reduce"]:
            moved = graph.op(name)
            graph.remove_op(name)
            graph.add_op(moved, after=after)
            after = name
    return after


def _emit_stacked_data(graph: Graph, data_ops: list[Op], parent: str, weights: list[str]) -> None:
    """One `linear_stacked_bwd_data(dy_G, W_1..W_n) -> dx` where the last of `data_ops` ran; they go."""
    dx = data_ops[0].outputs[0]
    last = max(data_ops, key=lambda o: _index(graph, o))
    # dx accumulates when a removed op or another writer did (the executor's rule then overwrites if the
    # stacked op ends up dx's first writer)
    acc = [dx] if any(dx in (d.attrs.get("accumulate_into") or ()) for d in data_ops) or \
        len(graph.producers(dx)) > len(data_ops) else []
    graph.add_op(Op(f"{last.name}+{len(data_ops)}", "linear_stacked_bwd_data", [parent, *weights], [dx],
                    {"scale": 1.0, "stacked": len(weights), "accumulate_into": acc}, last.phase, last.layer),
                 after=last.name)
    for op in data_ops:
        graph.remove_op(op.name)


def _index(graph: Graph, op: Op) -> int:
    return graph.order.index(op.name)
