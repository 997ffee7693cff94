"""The backward half of pass `fold_lora_up_projection` (lora_fold.py): the data gradient through the folded weights.

A folded projection's weight is `[W_i | tail_i]` with tail_i holding s * B_i in slot i and zeros in the other
members' slots, so

    [dx | dh_G] = sum_i dy_i @ [W_i | tail_i]

is the base data gradient in its first `in` columns and, in slot i, `dh_i = s * dy_i @ B_i` alone: one GEMM per
projection (or gate/up's stacked one) writes both, and the adapters' dh GEMMs, which each read a whole dy_i, go.
dx and dh_G become column views of that matrix; the down-projection's gradients (reading dh_G) move after its last
writer, and its data gradient then adds into dx (an accumulating write into a view of a written parent adds).
"""

from __future__ import annotations

from dataclasses import dataclass

from surogate.compiler.ir import Graph, Op, view_parent
from surogate.compiler.passes.lora_group import follow_all_reduces


@dataclass
class Backward:
    """The group's data gradient: base GEMMs into dx, the adapters' dh_i = s * dy_i @ B_i into dh_G's columns."""

    dx: str
    data_ops: list[Op]  # per member, or one stacked op (gate/up)
    dh_ops: list[Op]  # per member: dh_i = s * dy_i @ B_i
    dh_readers: list[Op]  # the down-projection's data and weight gradients (read dh_G)


def find_backward(graph: Graph, weights: list[str], merges: list[Op], hs: list[str],
                  columns: dict[str, list[str]]) -> Backward | None:
    """The base data-gradient GEMMs of the group's weights and the adapters' dh GEMMs, when one GEMM over the
    [W | tail] weights can write both: [dx | dh_G] = sum_i dy_i @ [W_i | tail_i] (tail_i holds s_i * B_i in
    slot i, zeros in the others' slots, so slot i receives dh_i alone). None when the shape differs (layer 0's
    input needs no gradient, other writers or readers of dx, dh written otherwise)."""
    data: list[Op] = []
    for w in weights:
        for name in graph.consumers(w):
            op = graph.op(name)
            if op.kind in ("linear_bwd_data", "linear_stacked_bwd_data") and op not in data:
                data.append(op)
    if not data or any(float(op.attrs.get("scale", 1.0)) != 1.0 for op in data):
        return None
    if len(data) == 1 and data[0].kind == "linear_stacked_bwd_data":
        if data[0].inputs[1:] != weights:
            return None
        dys = columns.get(data[0].inputs[0], [])
    elif len(data) == len(weights) and all(op.kind == "linear_bwd_data" for op in data):
        by_w = {op.inputs[1]: op for op in data}
        if set(by_w) != set(weights):
            return None
        data = [by_w[w] for w in weights]
        dys = [op.inputs[0] for op in data]
    else:
        return None
    dxs = {op.outputs[0] for op in data}
    if len(dys) != len(weights) or len(dxs) != 1:
        return None
    dx = dxs.pop()
    t = graph.tensors[dx]
    if t.attrs.get("view") or t.dtype != graph.tensors[weights[0]].dtype or f"{dx}+lora" in graph.tensors:
        return None
    dh_ops: list[Op] = []
    for m, dy in zip(merges, dys, strict=True):
        b = m.inputs[2]
        found = [graph.op(o) for o in graph.consumers(b) if graph.op(o).kind == "linear_bwd_data"]
        if len(found) != 1 or found[0].inputs != [dy, b] or len(found[0].outputs) != 1 \
                or float(found[0].attrs.get("scale", 1.0)) != float(m.attrs.get("scale", 1.0)) \
                or found[0].attrs.get("accumulate_into") or len(graph.producers(found[0].outputs[0])) != 1:
            return None
        dh_ops.append(found[0])
    dhs = [op.outputs[0] for op in dh_ops]
    dh_g = {view_parent(graph.tensors[d]) for d in dhs}
    if len(dh_g) != 1 or None in dh_g:
        return None
    dh_g_name = dh_g.pop()
    hs_cols = [graph.tensors[h].attrs["view"]["col"] for h in hs]
    if columns.get(dh_g_name) != dhs or [graph.tensors[d].attrs["view"]["col"] for d in dhs] != hs_cols \
            or graph.tensors[dh_g_name].attrs.get("view") or graph.producers(dh_g_name):
        return None
    if any(graph.consumers(d) for d in dhs):  # dh_i read on its own: not by the stacked GEMMs only
        return None
    readers = [graph.op(o) for o in graph.consumers(dh_g_name)]
    if sorted(op.kind for op in readers) != ["linear_stacked_bwd_data", "linear_stacked_bwd_weight"] \
            or any(op.inputs[0] != dh_g_name for op in readers):
        return None
    a_data = next(op for op in readers if op.kind == "linear_stacked_bwd_data")
    if a_data.outputs != [dx] or dx not in (a_data.attrs.get("accumulate_into") or ()):
        return None
    if sorted(graph.producers(dx)) != sorted([op.name for op in data] + [a_data.name]):
        return None
    norms = [graph.op(o) for o in graph.consumers(dx)]
    if len(norms) != 1 or norms[0].kind != "rmsnorm_bwd" or norms[0].inputs[0] != dx or norms[0].inputs.count(dx) != 1:
        return None  # (the norm backward's kernel takes dy with strided rows)
    return Backward(dx, data, dh_ops, readers)


def fold_backward(graph: Graph, bw: Backward, weights: list[str], augmented: list[str]) -> None:
    """[dx | dh_G] = sum_i dy_i @ [W_i | tail_i]: the base data GEMMs write D (dx and dh_G its column views), the
    dh GEMMs go, and dh_G's readers move after the last write of D."""
    dh_g = view_parent(graph.tensors[bw.dh_ops[0].outputs[0]])
    wide = graph.add_column_parent(f"{bw.dx}+lora", [bw.dx, dh_g])  # type: ignore[list-item]
    aug = dict(zip(weights, augmented, strict=True))
    written = []
    for op in bw.data_ops:
        acc = [wide] if bw.dx in (op.attrs.get("accumulate_into") or ()) else []
        new = Op(f"{op.name}.fold", op.kind, [op.inputs[0], *(aug[w] for w in op.inputs[1:])], [wide],
                 {**op.attrs, "accumulate_into": acc, "lora_fold": True}, op.phase, op.layer)
        graph.add_op(new, after=op.name)
        graph.remove_op(op.name)
        written.append(new.name)
    last = max(written, key=graph.order.index)
    for op in bw.dh_ops:
        graph.remove_op(op.name)
    for op in sorted(bw.dh_readers, key=lambda o: graph.order.index(o.name)):  # they read dh_G: after every
        graph.remove_op(op.name)                                                # GEMM writing a slot of it
        graph.add_op(op, after=last)
        last = follow_all_reduces(graph, op)  # (the dA gradients' all-reduces, in a data-parallel run)
