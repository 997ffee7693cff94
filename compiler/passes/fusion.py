"""Pass `fuse_lora_merge`: merge each LoRA projection's up-projection and residual add into one op.

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
"""

from __future__ import annotations

from typing import Any

from surogate.compiler.ir import Graph, GraphError

ENABLED = True  # module switch: False keeps the unfused linear + add pair


def fuse_lora_merge(graph: Graph, cfg: Any, *, enabled: bool | None = None) -> Graph:
    """Rewrite every LoRA `add` whose product input has a single producer and no other reader into `lora_merge`."""
    on = ENABLED if enabled is None else enabled
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
