"""Pass `fold_lora_up_projection`: a LoRA projection's up-projection inside its base GEMM.

After `group_lora_projections`, q/k/v (gate/up) compute `y_i = x @ W_i^T` (one stacked GEMM), `h_G = x @ [A]^T`
(one stacked GEMM, h_i its column views) and `out_i = lora_merge(y_i, h_i, B_i)` = y_i + s * h_i @ B_i^T: the
merge reads and writes every [tokens, out_i] element once more than the GEMM already did. Concatenating along K
removes it:

    X = [x | h_1 .. h_n]                    ([tokens, in + n*r]: the norm writes x, the stacked GEMM writes h_G)
    W_i+lora = [W_i | tail_i]               (tail_i [out_i, n*r]: s * B_i in slot i's r columns, zeros elsewhere)
    out_i = X @ W_i+lora^T                  (one GEMM per projection, or one stacked GEMM whose column views the
                                             outputs are where their readers take strided rows (gate/up: swiglu);
                                             the LoRA term accumulated in fp32 with the base product, one
                                             rounding: PEFT rounds both terms to bf16 first)

`x`, `h_G` are column views of X; `W_i` is a column view of `W_i+lora` (the checkpoint's weight is loaded into
it; the data gradient reads it with the wider row stride); `tail_i` is rewritten from B_i by `lora_fold_tail`
in every forward (B changes each optimizer step; the op is tiny). With recompute, the recompute segment
rebuilds X@rc: the norm's recompute writes x@rc into it and the group's down-projection runs again into its
tail (one stacked GEMM, instead of keeping h across the step: X's x part would have to be kept with it), and
the B gradients read h@rc. The base output tensors (y_i) and the merges go.

The backward reads the same weights (lora_fold_bwd.py): `[dx | dh_G] = sum_i dy_i @ [W_i | tail_i]` writes the
base data gradient and the adapters' dh_i at once, where the input needs a gradient.

Groups need: x written by a whole-row `rmsnorm` / `add_rmsnorm` (their kernel writes row-strided output) and read
only by GEMMs (which take strided operands); every member's merge present (forward, and in each recompute copy
when there is one); frozen base weights that are persistent device tensors read only by forward and data-gradient
GEMMs (no shards, offload copies, quantized weights); one dtype throughout; widths that keep 16-byte rows.
`SUROGATE_FUSIONS_OFF=fold_lora_up_projection` keeps the merges (the A/B).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from surogate.compiler.ir import DTYPE_BITS, Graph, Op, Role, Space, Tensor, view_columns, view_parent
from surogate.compiler.passes.fusion import _on
from surogate.compiler.passes.liveness import is_persistent
from surogate.compiler.passes.lora_fold_bwd import Backward, find_backward, fold_backward

ENABLED = True
ROW_ALIGN = 16  # bytes: X's and W+lora's rows, and x's width, keep the kernels' 16-byte row starts
_NORMS = ("rmsnorm", "add_rmsnorm")  # write x (their output 0) through a row-strided view
_GEMM_X = {("linear", 0), ("linear_stacked", 0), ("linear_bwd_weight", 1), ("linear_stacked_bwd_weight", 1)}
_W_READERS = ("linear", "linear_stacked", "linear_bwd_data", "linear_stacked_bwd_data")


@dataclass
class _Copy:
    """One run of the group's forward: the original (forward) or a recompute copy."""

    x: str  # the normalised input
    merges: list[Op]  # per member, its lora_merge
    base_ops: list[Op]  # the base GEMMs producing the merges' y (one stacked op or one per member)
    norm: Op  # the op writing x
    weights: list[str]  # per member, the frozen W its base GEMM reads


@dataclass
class _Group:
    down: Op  # linear_stacked(x, A_1..A_n) -> h_G
    hs: list[str]  # h_1..h_n (column views of h_G)
    weights: list[str]  # frozen W_1..W_n
    forward: _Copy
    recompute: list[_Copy] = field(default_factory=list)
    h_readers: list[Op] = field(default_factory=list)  # backward B-gradient GEMMs reading h_i
    backward: Backward | None = None


def fold_lora_up_projection(graph: Graph, cfg: Any, *, enabled: bool | None = None) -> Graph:
    """Fold each stacked LoRA group's up-projections into its base GEMMs (see the module doc)."""
    folded = 0
    groups: list[_Group] = []
    if _on("fold_lora_up_projection", ENABLED, enabled) and graph.meta.get("lora"):
        columns = view_columns(graph.tensors)
        downs = [op for op in graph.ops()
                 if op.kind == "linear_stacked" and op.attrs.get("lora") == "A" and op.phase == "forward"]
        groups = [g for op in downs if (g := _find(graph, op, columns)) is not None]
        gone = [name for g in groups for name in _fold(graph, g, columns)]
        folded = len(groups)
        if folded:
            graph.rewire()
            _drop_untouched(graph, gone)
    gemms = sum(int(op.attrs.get("stacked", 1)) for op in graph.ops()  # merges replaced by folded GEMMs
                if op.kind in ("linear", "linear_stacked") and op.attrs.get("lora_fold"))
    graph.meta["lora_folded"] = folded
    graph.meta["lora_folded_backward"] = sum(g.backward is not None for g in groups)
    graph.meta["lora_fold_fused"] = gemms  # (the plan report's fused ops: these merges became folded GEMMs)
    if "lora_merge_fused" in graph.meta:
        graph.meta["lora_merge_fused"] = int(graph.meta["lora_merge_fused"]) - gemms
    return graph


# -- detection ----------------------------------------------------------------------------------------------
def _find(graph: Graph, down: Op, columns: dict[str, list[str]]) -> _Group | None:
    x, h_g = down.inputs[0], down.outputs[0]
    hs = columns.get(h_g, [])
    if len(hs) != len(down.inputs) - 1 or len(down.outputs) != 1 or view_parent(graph.tensors[h_g]):
        return None
    merges: list[list[Op]] = []  # per member: [forward merge, recompute merges...]
    h_readers: list[Op] = []
    for h in hs:
        ms = []
        for name in graph.consumers(h):
            op = graph.op(name)
            if op.kind == "lora_merge" and op.inputs[1] == h and op.inputs.count(h) == 1:
                ms.append(op)
            elif op.kind == "linear_bwd_weight" and op.inputs[1] == h and op.phase != "forward":
                h_readers.append(op)
            else:
                return None
        fwd = [m for m in ms if m.phase == "forward"]
        if len(fwd) != 1:
            return None
        merges.append(fwd + [m for m in ms if m.phase != "forward"])
    n_copies = len(merges[0])
    if any(len(ms) != n_copies for ms in merges) or n_copies > 2:
        return None
    copies = [_copy(graph, [ms[k] for ms in merges], columns) for k in range(n_copies)]
    if any(c is None for c in copies) or copies[0].x != x:  # type: ignore[union-attr]
        return None
    weights = copies[0].weights  # type: ignore[union-attr]
    if any(c.weights != weights for c in copies[1:]):  # type: ignore[union-attr]
        return None
    group = _Group(down, hs, weights, copies[0], copies[1:], h_readers)  # type: ignore[arg-type]
    if not _fits(graph, group, columns):
        return None
    group.backward = find_backward(graph, group.weights, group.forward.merges, group.hs, columns)
    return group


def _copy(graph: Graph, merges: list[Op], columns: dict[str, list[str]]) -> _Copy | None:
    """The run of the group these merges belong to: one x, one norm writing it, base GEMMs over it (a linear per
    member writing its y, or one stacked GEMM whose column views the y are), and the W each member's reads."""
    base_ops: list[Op] = []
    weights: list[str] = []
    for m in merges:
        if m.attrs.get("accumulate_into"):
            return None
        y = m.inputs[0]
        parent = view_parent(graph.tensors[y])
        writers = graph.producers(parent or y)
        if len(writers) != 1:
            return None
        writer = graph.op(writers[0])
        if writer.kind not in ("linear", "linear_stacked") or "lora" in writer.attrs \
                or float(writer.attrs.get("scale", 1.0)) != 1.0 or writer.attrs.get("accumulate_into"):
            return None
        if writer.kind == "linear":
            if len(writer.inputs) != 2 or parent is not None:
                return None
            weights.append(writer.inputs[1])
        else:
            views = columns.get(writer.outputs[0], [])
            if parent != writer.outputs[0] or len(views) != len(writer.inputs) - 1:
                return None
            weights.append(writer.inputs[1 + views.index(y)])
        if writer not in base_ops:
            base_ops.append(writer)
    xs = {op.inputs[0] for op in base_ops}
    if len(xs) != 1:
        return None
    x = xs.pop()
    prod = graph.producers(x)
    if len(prod) != 1 or graph.tensors[x].attrs.get("view"):
        return None
    norm = graph.op(prod[0])
    if norm.kind not in _NORMS or norm.outputs[0] != x or norm.attrs.get("group") \
            or norm.attrs.get("accumulate_into"):
        return None
    return _Copy(x, merges, base_ops, norm, weights)


def _fits(graph: Graph, g: _Group, columns: dict[str, list[str]]) -> bool:
    x = graph.tensors[g.forward.x]
    isz = DTYPE_BITS[x.dtype] // 8
    n, r = len(g.hs), graph.tensors[g.hs[0]].shape[-1]
    width = x.shape[-1] + n * r
    if (x.shape[-1] * isz) % ROW_ALIGN or (width * isz) % ROW_ALIGN:
        return False
    for c in (g.forward, *g.recompute):
        # every reader of x takes a strided operand, and the base GEMMs have no other readers than the merges
        for name in graph.consumers(c.x):
            op = graph.op(name)
            if not any(op.kind == k and op.inputs[i] == c.x and op.inputs.count(c.x) == 1 for k, i in _GEMM_X):
                return False
        for b in c.base_ops:
            for y in (b.outputs[0], *columns.get(b.outputs[0], [])):
                if any(graph.op(r_) not in c.merges for r_ in graph.consumers(y)):
                    return False
        for m in c.merges:
            if graph.tensors[m.outputs[0]].dtype != x.dtype or graph.tensors[m.inputs[2]].dtype != x.dtype:
                return False
    for w in g.weights:
        t = graph.tensors[w]
        if (t.role is not Role.FROZEN_WEIGHT or t.space is not Space.DEVICE or not is_persistent(t)
                or t.dtype != x.dtype or t.attrs.get("view") or len(t.shape) != 2 or graph.producers(w)):
            return False
        if any(graph.op(o).kind not in _W_READERS for o in graph.consumers(w)):
            return False
    new = [f"{c.x}+lora" for c in (g.forward, *g.recompute)] + [f"{w}+lora" for w in g.weights]
    new += [f"{h}@rc" for h in g.hs] + [f"{g.down.outputs[0]}@rc"]
    return not any(name in graph.tensors for name in new)


# -- rewrite ------------------------------------------------------------------------------------------------
def _fold(graph: Graph, g: _Group, columns: dict[str, list[str]]) -> list[str]:
    """Rewrite one group; returns the tensors only the removed ops touched (dropped after the rewire)."""
    gone = [y for c in (g.forward, *g.recompute) for b in c.base_ops
            for y in (*columns.get(b.outputs[0], []), b.outputs[0])]  # (the base outputs' views: untouched so far)
    n = len(g.hs)
    augmented = [_augment(graph, w, n, i, g.forward.merges[i], g.down) for i, w in enumerate(g.weights)]
    _restack(graph, g.weights, augmented)
    h_g = g.down.outputs[0]
    graph.add_column_parent(f"{g.forward.x}+lora", [g.forward.x, h_g])  # X = [x | h_G]
    _replace_merges(graph, g.forward, augmented, g.forward.x)
    for k, c in enumerate(g.recompute):
        for h in g.hs:
            src = graph.tensors[h]
            graph.add_tensor(Tensor(f"{h}@rc", src.shape, src.dtype, src.role, src.space, src.layer))
        h_rc = graph.add_column_parent(f"{h_g}@rc", [f"{h}@rc" for h in g.hs])  # h_G's layout
        graph.add_column_parent(f"{c.x}+lora", [c.x, h_rc])  # X@rc = [x@rc | h_G@rc]
        # the down-projection again, into the recomputed X's tail (instead of keeping h across the step)
        graph.add_op(Op(f"rc:{g.down.name}", "linear_stacked", [c.x, *g.down.inputs[1:]], [h_rc],
                        {**g.down.attrs, "recompute": True}, c.norm.phase, c.norm.layer), after=c.norm.name)
        _replace_merges(graph, c, augmented, c.x)
        if k == 0:
            for op in g.h_readers:  # the B gradients read the recomputed h
                op.inputs = [f"{t}@rc" if t in g.hs else t for t in op.inputs]
    if g.backward is not None:
        fold_backward(graph, g.backward, g.weights, augmented)
    return gone


def _augment(graph: Graph, w: str, n: int, slot: int, merge: Op, down: Op) -> str:
    """W+lora = [W | tail] (W and tail its column views) and the op writing the tail from B before the GEMM."""
    t = graph.tensors[w]
    out, inner = t.shape
    b = merge.inputs[2]
    width = n * graph.tensors[b].shape[-1]
    aug = graph.add_tensor(Tensor(f"{w}+lora", (out, inner + width), t.dtype, Role.FROZEN_WEIGHT, layer=t.layer,
                                  attrs={"fold": "weight"}))
    tail = graph.add_tensor(Tensor(f"{w}+lora.tail", (out, width), t.dtype, Role.FROZEN_WEIGHT, layer=t.layer,
                                   attrs={"fold": "tail", "view": {"of": aug.name, "col": inner}}))
    t.attrs["view"] = {"of": aug.name, "col": 0}
    graph.add_op(Op(f"{merge.name}.tail", "lora_fold_tail", [b], [tail.name],
                    {"scale": float(merge.attrs.get("scale", 1.0)), "slot": slot, "slots": n}, "forward",
                    merge.layer), after=down.name)
    return aug.name


def _restack(graph: Graph, weights: list[str], augmented: list[str]) -> None:
    """The [W | tail] weights back to back (a stack): the stacked data-gradient GEMM reads their W columns as one
    strided matrix. A stack of the plain weights is replaced by it."""
    stacks: dict[str, list[str]] = graph.meta.setdefault("stacks", {})
    for key, members in list(stacks.items()):
        if members == weights:
            stacks[key] = list(augmented)
            return
    if not any(w in members for members in stacks.values() for w in weights):
        stacks[f"{augmented[0]}+{len(augmented)}"] = list(augmented)


def _replace_merges(graph: Graph, c: _Copy, augmented: list[str], x: str) -> None:
    """Each merge becomes out_i = X @ W_i+lora^T in its place, or, where every reader of the outputs takes
    row-strided views (gate/up: swiglu and its backward), one stacked GEMM X @ [W_1+lora; ...]^T whose column
    views they become; the base GEMMs go."""
    wide = f"{x}+lora"
    extra = {"recompute": True} if c.merges[0].attrs.get("recompute") else {}
    outs = [m.outputs[0] for m in c.merges]
    if len(outs) > 1 and all(_strided_readers_only(graph, o) for o in outs):
        first = c.merges[0]
        parent = graph.add_column_parent(f"{outs[0]}+{len(outs)}", outs)
        graph.add_op(Op(f"{first.name}.fold+{len(outs)}", "linear_stacked", [wide, *augmented], [parent],
                        {"scale": 1.0, "stacked": len(outs), "lora_fold": True, **extra}, first.phase, first.layer),
                     after=first.name)
        for m in c.merges:
            graph.remove_op(m.name)
    else:
        for m, aug in zip(c.merges, augmented, strict=True):
            graph.add_op(Op(f"{m.name}.fold", "linear", [wide, aug], list(m.outputs),
                            {"scale": 1.0, "lora_fold": True, **extra}, m.phase, m.layer), after=m.name)
            graph.remove_op(m.name)
    for b in c.base_ops:
        graph.remove_op(b.name)


# (kind, input position) of the kernels that read a projection's output through a row-strided view
_STRIDED_READERS = {("swiglu", 0), ("swiglu", 1), ("swiglu_bwd", 1), ("swiglu_bwd", 2)}


def _strided_readers_only(graph: Graph, name: str) -> bool:
    t = graph.tensors[name]
    if t.attrs.get("view") or len(graph.producers(name)) != 1:
        return False
    for r in graph.consumers(name):
        op = graph.op(r)
        if op.inputs.count(name) != 1 or (op.kind, op.inputs.index(name)) not in _STRIDED_READERS:
            return False
    return bool(graph.consumers(name))


def _drop_untouched(graph: Graph, names: list[str]) -> None:
    """The base outputs (views first, then their parents) leave the table: no op touches them any more."""
    touched = {t for op in graph.ops() for t in (*op.inputs, *op.outputs)}
    for name in names:
        if name not in touched:
            graph.remove_tensor(name)
