"""Post-autodiff fusions: passes `fuse_lora_merge`, `fuse_add_rmsnorm` and `fuse_rmsnorm_rope`.

`fuse_lora_merge`: merge each LoRA projection's up-projection and residual add into one op.

`inject_lora` writes a targeted projection as
    y.base = linear(x, W);  h = linear(x, A);  y.lora_b = linear(h, B, scale);  y = add(y.base, y.lora_b)
so every forward (and recompute) run materialises y.lora_b, a [rows, out_features] tensor in the adapter dtype
(fp32 by default: 4 bytes per element written, read back and cast, before the add reads base and writes y). After
autodiff nothing but that add reads y.lora_b (the backward of `linear` reads its inputs and the output
gradient, the backward of `add` only the gradient), so the pair can become one `lora_merge(base, h, B) -> y`
that reads the small h and B and the base and writes y once. The math is unchanged: `lora_merge` is defined as
the pair (the product rounded to the adapter dtype, then to base's), and on the cpu backend it runs the same
two reference kernels, bit for bit.

It runs after `recompute`, so the recomputed copies (`rc:...`, outputs `...@rc`) are fused too, and before
the memory passes, which then never see y.lora_b. `ENABLED = False` (or `fuse_lora_merge(graph, cfg,
enabled=False)`) keeps the unfused program, e.g. to compare the two.

`fuse_add_rmsnorm`: a decoder layer's residual add `s = add(x, o)` is read next by the RMSNorm of the following
block, `y = rmsnorm(s, w)`, so `s` is written by the add and read straight back. `add_rmsnorm(x, o, w) -> (y, s)`
computes both in one pass (the kernel's fused residual: x and o read once, s and y written once). It fuses only
an add immediately followed in program order by the norm of its output (so no op between them could need `s`
or change the weight), with equal dtypes and shapes and no accumulation; the fused op keeps the norm's name,
which its backward ops name as `fwd_op`. `s` stays a planned tensor (the backward and the next residual add
read it); only the add op disappears.

`fuse_rmsnorm_rope`: Qwen3's per-head q/k norm `n = rmsnorm(q, w, group=head_dim)` is read only by the rotation
`r = rope(n, pos, cos, sin)` (the norm's backward reads q, rope's backward only the gradient), so n is written
and read straight back. `rmsnorm_rope(q, w, pos, cos, sin) -> r` does both in one pass (the norm kernel's rope
epilogue) and n is no longer planned. It fuses a table rope (not `use_fused_rope`) whose input has the norm as
its only writer and itself as its only reader, in the same phase, over whole heads, one dtype throughout and no
accumulation; the fused op takes the rope's place and name (`fused_norm` names the norm). In the backward,
`dn = rope_bwd(dr, ...)` read only by `dq = rmsnorm_bwd(dn, q, w)` (no weight gradient reading dn: LoRA's
frozen norms) becomes `rmsnorm_rope_bwd(dr, q, w, pos, cos, sin) -> dq` in the norm backward's place and name.
"""

from __future__ import annotations

import os
from typing import Any

from surogate.compiler.ir import Graph, GraphError

ENABLED = True  # module switch: False keeps the unfused linear + add pair
ADD_RMSNORM_ENABLED = True  # module switch: False keeps the add + rmsnorm pairs
RMSNORM_ROPE_ENABLED = True  # module switch: False keeps the q/k rmsnorm + rope pairs
OFF_ENV = "SUROGATE_FUSIONS_OFF"  # comma-separated pass names to skip (e.g. to A/B or bisect a fused kernel)
OFF_ALL = "all"  # in $SUROGATE_FUSIONS_OFF: every fusion and stacking pass off (the plain op-per-layer program)


def _on(name: str, module_default: bool, enabled: bool | None) -> bool:
    """The pass runs: `enabled` when given, else the module switch, unless $SUROGATE_FUSIONS_OFF names it (or
    says `all`)."""
    if enabled is not None:
        return enabled
    off = {p.strip() for p in os.environ.get(OFF_ENV, "").split(",")}
    return module_default and name not in off and OFF_ALL not in off


def fuse_lora_merge(graph: Graph, cfg: Any, *, enabled: bool | None = None) -> Graph:
    """Rewrite every LoRA `add` whose product input has a single producer and no other reader into `lora_merge`."""
    on = _on("fuse_lora_merge", ENABLED, enabled)
    fused = 0
    if on and graph.meta.get("lora"):
        for add in [op for op in graph.ops() if op.kind == "add" and op.attrs.get("lora") == "merge"]:
            fused += _fuse_one(graph, add)
        if fused:
            graph.rewire()
            _check_gone(graph)
    graph.meta["lora_merge_fused"] = fused
    return graph


def _fuse_one(graph: Graph, add: Any) -> int:
    """Fuse one add with its producing `linear(lora="B")`; 0 when the pattern does not hold (left unchanged)."""
    prod = add.inputs[1]
    writers, readers = graph.producers(prod), graph.consumers(prod)
    if len(writers) != 1 or readers != [add.name]:
        return 0
    lin = graph.op(writers[0])
    if lin.kind != "linear" or lin.attrs.get("lora") != "B" or len(lin.inputs) != 2 or lin.phase != add.phase:
        return 0
    if add.attrs.get("accumulate_into"):
        return 0
    h, b = lin.inputs
    add.kind = "lora_merge"
    add.inputs[:] = [add.inputs[0], h, b]
    add.attrs = {**add.attrs, "scale": float(lin.attrs.get("scale", 1.0))}
    graph.remove_op(lin.name)
    graph.remove_tensor(prod)  # its only writer is gone and its only reader reads h and B now
    return 1


def _check_gone(graph: Graph) -> None:
    for op in graph.ops():
        for t in (*op.inputs, *op.outputs):
            if t not in graph.tensors:
                raise GraphError(f"fuse_lora_merge: op {op.name!r} still uses the removed tensor {t!r}")


def fuse_add_rmsnorm(graph: Graph, cfg: Any, *, enabled: bool | None = None) -> Graph:
    """Rewrite every `s = add(a, b)` directly followed by `y = rmsnorm(s, w)` into `add_rmsnorm(a, b, w) -> (y, s)`."""
    on = _on("fuse_add_rmsnorm", ADD_RMSNORM_ENABLED, enabled)
    fused = 0
    if on:
        nxt = dict(zip(graph.order, graph.order[1:], strict=False))
        for add in [op for op in graph.ops() if op.kind == "add" and not op.attrs.get("lora")]:
            norm = graph.op(nxt[add.name]) if add.name in nxt else None
            if norm is not None and _fusable(graph, add, norm):
                y, w = norm.outputs[0], norm.inputs[1]
                norm.kind = "add_rmsnorm"
                norm.inputs[:] = [add.inputs[0], add.inputs[1], w]
                norm.outputs[:] = [y, add.outputs[0]]
                norm.attrs = {**norm.attrs, "fused_add": add.name}
                graph.remove_op(add.name)
                fused += 1
    return _finish(graph, "add_rmsnorm_fused", fused)


def _finish(graph: Graph, key: str, fused: int) -> Graph:
    """After a rewriting pass: edges rebuilt and the graph checked when anything was fused; the count in meta."""
    if fused:
        graph.rewire()
        graph.check()
    graph.meta[key] = fused
    return graph


def _fusable(graph: Graph, add: Any, norm: Any) -> bool:
    """`norm` normalises (whole rows) exactly `add`'s output, in the same phase, and nothing accumulates."""
    if norm.kind != "rmsnorm" or norm.inputs[0] != add.outputs[0] or norm.phase != add.phase:
        return False
    if norm.attrs.get("group") or add.attrs.get("accumulate_into") or norm.attrs.get("accumulate_into"):
        return False
    t = [graph.tensors[n] for n in (*add.inputs, add.outputs[0], norm.outputs[0])]
    return len({x.dtype for x in t}) == 1 and len({tuple(x.shape) for x in t}) == 1


def fuse_rmsnorm_rope(graph: Graph, cfg: Any, *, enabled: bool | None = None) -> Graph:
    """Rewrite every `r = rope(rmsnorm(q, w, group=head_dim), pos, cos, sin)` whose normalised tensor nothing
    else reads into `rmsnorm_rope(q, w, pos, cos, sin) -> r`."""
    on = _on("fuse_rmsnorm_rope", RMSNORM_ROPE_ENABLED, enabled)
    fused = 0
    if on:
        for rope in [op for op in graph.ops() if op.kind == "rope" and len(op.inputs) == 4]:
            norm = _rope_norm(graph, rope)
            if norm is None:
                continue
            normed = rope.inputs[0]
            rope.kind = "rmsnorm_rope"
            rope.inputs[:] = [norm.inputs[0], norm.inputs[1], *rope.inputs[1:]]
            rope.attrs = {**rope.attrs, "eps": norm.attrs["eps"], "group": norm.attrs["group"],
                          "fused_norm": norm.name}
            graph.remove_op(norm.name)
            graph.remove_tensor(normed)
            fused += 1
        for bwd in [op for op in graph.ops() if op.kind == "rmsnorm_bwd"]:
            rope_bwd = _norm_rope_bwd(graph, bwd)
            if rope_bwd is None:
                continue
            dnormed = bwd.inputs[0]
            bwd.kind = "rmsnorm_rope_bwd"
            bwd.inputs[:] = [rope_bwd.inputs[0], *bwd.inputs[1:], *rope_bwd.inputs[1:]]
            bwd.attrs = {**rope_bwd.attrs, **bwd.attrs, "fused_rope_bwd": rope_bwd.name}
            graph.remove_op(rope_bwd.name)
            graph.remove_tensor(dnormed)
            fused += 1
    return _finish(graph, "rmsnorm_rope_fused", fused)


def _norm_rope_bwd(graph: Graph, bwd: Any) -> Any | None:
    """The table `rope_bwd` whose output only `bwd` (an rmsnorm_bwd over whole heads) reads, or None."""
    dnormed = bwd.inputs[0]
    rb = _sole_writer(graph, dnormed, bwd.name)
    if rb is None or rb.kind != "rope_bwd" or len(rb.inputs) != 4 or rb.phase != bwd.phase:
        return None
    if bwd.attrs.get("group") != rb.attrs.get("head_dim") or rb.attrs.get("accumulate_into"):
        return None
    if bwd.attrs.get("accumulate_into") or bwd.attrs.get("accumulate"):
        return None
    if not _unchanged_after(graph, rb.inputs[0], rb.name):  # dr must not change before the norm backward
        return None
    return rb if _one_dtype(graph, (rb.inputs[0], dnormed, *bwd.inputs[1:], *bwd.outputs)) else None


def _rope_norm(graph: Graph, rope: Any) -> Any | None:
    """The per-head rmsnorm `rope` can absorb (see the module doc), or None."""
    normed = rope.inputs[0]
    norm = _sole_writer(graph, normed, rope.name)
    if norm is None or norm.kind != "rmsnorm" or norm.phase != rope.phase:
        return None
    if norm.attrs.get("group") != rope.attrs.get("head_dim"):
        return None
    if norm.attrs.get("accumulate_into") or rope.attrs.get("accumulate_into"):
        return None
    x = norm.inputs[0]
    if not _unchanged_after(graph, x, norm.name):  # x must not change before the rope reads it
        return None
    return norm if _one_dtype(graph, (x, norm.inputs[1], normed, rope.outputs[0])) else None


def _sole_writer(graph: Graph, tensor: str, reader: str) -> Any | None:
    """The one op writing `tensor` when op `reader` is its only reader, else None."""
    writers = graph.producers(tensor)
    if len(writers) != 1 or graph.consumers(tensor) != [reader]:
        return None
    return graph.op(writers[0])


def _unchanged_after(graph: Graph, tensor: str, op_name: str) -> bool:
    """No op after `op_name` in program order writes `tensor`."""
    at = graph.order.index
    return all(at(w) <= at(op_name) for w in graph.producers(tensor))


def _one_dtype(graph: Graph, names: Any) -> bool:
    return len({graph.tensors[n].dtype for n in names}) == 1
