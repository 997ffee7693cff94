"""Pass `group_lora_projections`: one GEMM for the LoRA down-projections that share an input.

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
only these ops and the optimizer touch (no ZeRO shards, offload copies or collectives), and a byte size that is
a multiple of `STACK_ALIGN` so adjacent members are exactly a stacked matrix. Whatever does not fit keeps its
unstacked ops. The planner (`assign_buffers`) places each `graph.meta["stacks"]` entry contiguously; column views
carry `attrs["view"] = {"of": parent, "col": first column}` and take no memory of their own.
`SUROGATE_FUSIONS_OFF=group_lora_projections` keeps the unstacked program (to A/B the two).
"""

from __future__ import annotations

from typing import Any

from surogate.compiler.ir import Graph, Op, Role, Space, Tensor
from surogate.compiler.passes.fusion import _on
from surogate.compiler.passes.liveness import is_persistent

ENABLED = True
STACK_ALIGN = 16  # bytes: kernels' vector loads need members starting at 16-byte boundaries
# Kinds allowed to read a column view h_i (by position of h_i among the inputs).
_H_READERS = {("lora_merge", 1), ("linear_bwd_weight", 1), ("linear", 0)}


def group_lora_projections(graph: Graph, cfg: Any, *, enabled: bool | None = None) -> Graph:
    """Stack the A weights of LoRA adapters sharing an input; rewrite their forward and backward GEMMs."""
    stacks: dict[str, list[str]] = graph.meta.setdefault("stacks", {})
    grouped = 0
    if _on("group_lora_projections", ENABLED, enabled) and graph.meta.get("lora"):
        position = {n: i for i, n in enumerate(graph.tensors)}
        for members in _forward_groups(graph):
            weights = [op.inputs[1] for op in members]
            grads = _weight_gradients(graph, weights)
            if grads is None or not _stackable(graph, weights, grads, members):
                continue
            order = sorted(range(len(members)), key=lambda i: position[weights[i]])
            members = [members[i] for i in order]
            weights = [weights[i] for i in order]
            key = f"{weights[0].removesuffix('.weight')}+{len(weights)}"
            if key in stacks:
                continue
            stacks[key] = weights
            stacks[f"{key}.grad"] = [grads[w] for w in weights]
            _stack_forward(graph, members, weights)
            for rc in _recompute_groups(graph, weights):
                _stack_forward(graph, rc, weights)
            _stack_backward(graph, weights, grads)
            grouped += 1
        if grouped:
            graph.rewire()
    graph.meta["lora_groups"] = grouped
    return graph


def _forward_groups(graph: Graph) -> list[list[Op]]:
    """Forward `linear` ops of LoRA A weights, grouped by their shared input (two or more per group)."""
    by_input: dict[tuple[str, str], list[Op]] = {}
    for op in graph.ops():
        if op.kind == "linear" and op.attrs.get("lora") == "A" and len(op.inputs) == 2 and op.phase == "forward":
            by_input.setdefault((op.phase, op.inputs[0]), []).append(op)
    return [ops for ops in by_input.values() if len(ops) >= 2]


def _recompute_groups(graph: Graph, weights: list[str]) -> list[list[Op]]:
    """Recompute copies of a stacked group's forward GEMMs (present when recompute re-runs the adapters)."""
    found: dict[str, list[Op | None]] = {}
    for op in graph.ops():
        if op.kind == "linear" and op.attrs.get("lora") == "A" and op.phase != "forward" and op.inputs[1] in weights:
            found.setdefault(op.inputs[0], [None] * len(weights))[weights.index(op.inputs[1])] = op
    return [ops for ops in found.values() if all(ops) and all(_h_ok(graph, o) for o in ops)]  # type: ignore[misc]


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
        if t.attrs.get("stack") or t.attrs.get("view"):
            return False
    for w, g in zip(ws, gs, strict=True):
        for name, allowed in ((w.name, ("linear", "linear_bwd_data")), (g.name, ("linear_bwd_weight",))):
            for o in graph.consumers(name) + graph.producers(name):
                op = graph.op(o)
                if op.phase != "optimizer" and op.kind not in allowed:
                    return False
    return all(_h_ok(graph, op) for op in ops) and _backward_pairs(graph, weights, grads) is not None


def _h_ok(graph: Graph, op: Op) -> bool:
    """The op's output h is written by it alone and read only by kinds that take a column view of it."""
    h = op.outputs[0]
    if len(op.outputs) != 1 or graph.producers(h) != [op.name] or graph.tensors[h].attrs.get("view"):
        return False
    for r in graph.consumers(h):
        rop = graph.op(r)
        if not any(rop.kind == k and rop.inputs[i] == h and rop.inputs.count(h) == 1 for k, i in _H_READERS):
            return False
    return True


def _backward_pairs(graph: Graph, weights: list[str], grads: dict[str, str]) -> list[tuple[Op | None, Op]] | None:
    """Per weight, its (linear_bwd_data or None, linear_bwd_weight) reading one dh; None unless all have the
    stacked shape: one weight gradient each, data gradients for all or none (none: the input needs no gradient,
    layer 0 of a LoRA model), the same dx and x, dh written once by a non-accumulating op."""
    pairs: list[tuple[Op | None, Op]] = []
    for w in weights:
        data = [graph.op(o) for o in graph.consumers(w) if graph.op(o).kind == "linear_bwd_data"]
        wgrad = [graph.op(o) for o in graph.producers(grads[w])]
        if len(data) > 1 or len(wgrad) != 1 or wgrad[0].kind != "linear_bwd_weight":
            return None
        d, g = (data[0] if data else None), wgrad[0]
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
    if data_ops:
        if len({d.outputs[0] for d in data_ops}) != 1:
            return None
        # the stacked data gradient runs where the last of them did: nothing may read dx in between
        at = [_index(graph, d) for d in data_ops]
        if any(min(at) < _index(graph, graph.op(r)) < max(at) for r in graph.consumers(data_ops[0].outputs[0])):
            return None
    return pairs


def _parent(graph: Graph, members: list[str], name: str, role: Role) -> str:
    """A [.., sum of widths] tensor whose column slices are `members` (which become views of it)."""
    ts = [graph.tensors[m] for m in members]
    lead = ts[0].shape[:-1]
    width = sum(t.shape[-1] for t in ts)
    graph.add_tensor(Tensor(name, (*lead, width), ts[0].dtype, role, layer=ts[0].layer))
    col = 0
    for t in ts:
        t.attrs["view"] = {"of": name, "col": col}
        col += t.shape[-1]
    return name


def _stack_forward(graph: Graph, ops: list[Op], weights: list[str]) -> None:
    """Replace the group's `linear(x, A_i) -> h_i` by one `linear_stacked(x, A_1..A_n) -> h_G`."""
    hs = [op.outputs[0] for op in ops]
    parent = _parent(graph, hs, f"{hs[0]}+{len(hs)}", graph.tensors[hs[0]].role)
    first = min(ops, key=lambda o: _index(graph, o))  # where the first h_i was written: before any reader
    graph.add_op(Op(f"{first.name}+{len(ops)}", "linear_stacked", [first.inputs[0], *weights], [parent],
                    {"scale": 1.0, "lora": "A", "stacked": len(weights)}, first.phase, first.layer),
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
    parent = _parent(graph, dhs, f"{dhs[0]}+{len(dhs)}", graph.tensors[dhs[0]].role)
    if data_ops:
        dx = data_ops[0].outputs[0]
        last = max(data_ops, key=lambda o: _index(graph, o))
        # dx accumulates when a removed op or another writer did (the executor's rule then overwrites if the
        # stacked op ends up dx's first writer)
        acc = [dx] if any(dx in (d.attrs.get("accumulate_into") or ()) for d in data_ops) or \
            len(graph.producers(dx)) > len(data_ops) else []
        graph.add_op(Op(f"{last.name}+{len(pairs)}", "linear_stacked_bwd_data", [parent, *weights], [dx],
                        {"scale": 1.0, "stacked": len(weights), "accumulate_into": acc}, last.phase, last.layer),
                     after=last.name)
    last = max(grad_ops, key=lambda o: _index(graph, o))
    gnames = [grads[w] for w in weights]
    graph.add_op(Op(f"{last.name}+{len(pairs)}", "linear_stacked_bwd_weight", [parent, grad_ops[0].inputs[1]],
                    gnames, {"scale": 1.0, "stacked": len(weights), "accumulate_into": list(gnames)}, last.phase,
                    last.layer), after=last.name)
    for op in (*data_ops, *grad_ops):
        graph.remove_op(op.name)


def _index(graph: Graph, op: Op) -> int:
    return graph.order.index(op.name)
