"""Pass `apply_recompute`: keep only per-layer checkpoints, recompute the rest of a layer in backward.

With `recompute: true`, for each decoder layer the forward tensors that only that layer's backward
reads (norm outputs, q/k/v, attention output, MLP intermediates, the mid-layer residual, ...) are no
longer kept: the layer's forward ops that produce them are re-emitted (phase "backward",
`attrs["recompute"] = True`, outputs renamed `<name>@rc`) just before the layer's first backward op,
and the backward ops read the recomputed copies. What stays saved is what other layers' backward
reads: the residual stream between layers (`attrs["residual"] == "layer_input"`). Re-emitted ops are
the same ops with the same attributes (dropout regenerates its mask from its seed), so gradients are
bit-identical to the non-recomputed program.

LoRA's down-projections (`h = x @ A^T`, the outputs of `linear` ops with `attrs["lora"] == "A"`, [tokens, rank])
are always kept: rank/width of their input's size (1/64 at rank 16, hidden 1024; 25 MiB over Qwen3-0.6B's 196
adapters at 4096 tokens), and keeping them spares the recompute one skinny GEMM per adapter, each reading the
whole input of its projection (the merge and the B gradient read the kept h). Not with `offload_residual`: there
the device's activations are promised independent of depth, so h is recomputed as before.

`SUROGATE_RECOMPUTE_KEEP` (an experiment switch, not a config option; comma-separated) keeps more checkpoints,
for measuring the trade on a GPU: `ffn_input` the mid-layer residual (`attrs["residual"] == "ffn_input"`: the
recompute then needs neither the attention output projection nor the residual add), `attention` the attention
outputs (output and log-sum-exp: the recompute rebuilds q/k/v for the attention backward but runs no attention
forward). Only what a dropped tensor needs and is not itself kept for the backward is re-emitted.
"""

from __future__ import annotations

import os
from collections import defaultdict
from typing import Any

from surogate.compiler.ir import Graph, GraphError, Op, Role, Tensor
from surogate.errors import UserError

KEEP_ENV = "SUROGATE_RECOMPUTE_KEEP"  # comma-separated: residual kinds and op kinds kept besides "layer_input"
RESIDUAL_KINDS = frozenset({"layer_input", "ffn_input"})  # attrs["residual"] the model builder sets
KEEPABLE_OPS = frozenset({"attention"})  # op kinds whose outputs $SUROGATE_RECOMPUTE_KEEP may keep


def _keep_entries() -> set[str]:
    entries = {k.strip() for k in os.environ.get(KEEP_ENV, "").split(",") if k.strip()}
    unknown = entries - RESIDUAL_KINDS - KEEPABLE_OPS
    if unknown:  # a misspelt switch would measure the plain recompute under another name
        raise UserError(f"{KEEP_ENV} (environment): unknown {sorted(unknown)}; known: {sorted(RESIDUAL_KINDS | KEEPABLE_OPS)}")
    return entries


def kept_residuals() -> frozenset[str]:
    """Residual kinds (`attrs["residual"]`) saved as checkpoints: the layer input, plus $SUROGATE_RECOMPUTE_KEEP's."""
    return frozenset({"layer_input", *(_keep_entries() & RESIDUAL_KINDS)})


def kept_op_kinds() -> frozenset[str]:
    """Op kinds whose outputs are saved as checkpoints ($SUROGATE_RECOMPUTE_KEEP's, e.g. `attention`)."""
    return frozenset(_keep_entries() & KEEPABLE_OPS)


def apply_recompute(graph: Graph, cfg: Any) -> Graph:
    """Rewrite the backward program to recompute layer intermediates (no-op when `recompute: false`)."""
    if not getattr(cfg, "recompute", True):
        graph.meta["recompute"] = False
        return graph
    if not graph.meta.get("backward"):
        raise GraphError("apply_recompute needs the backward program (run emit_backward first)")
    fwd_by_layer: dict[int, list[Op]] = defaultdict(list)
    bwd_by_layer: dict[int, list[Op]] = defaultdict(list)
    readers_layers: dict[str, set[int | None]] = defaultdict(set)
    for op in graph.ops():
        if op.phase == "forward" and op.layer is not None:
            fwd_by_layer[op.layer].append(op)
        elif op.phase == "backward":
            if op.layer is not None:
                bwd_by_layer[op.layer].append(op)
            for t in op.inputs:
                readers_layers[t].add(op.layer)

    keep, keep_ops = kept_residuals(), kept_op_kinds()
    keep_lora_a = not getattr(cfg, "offload_residual", False)
    insert_before: dict[str, list[str]] = {}
    for layer, fops in fwd_by_layer.items():
        bops = bwd_by_layer.get(layer)
        if not bops:
            continue
        produced = {o for op in fops for o in op.outputs}
        kept_outputs = {o for op in fops if op.kind in keep_ops or (keep_lora_a and op.attrs.get("lora") == "A")
                        for o in op.outputs}
        drop = {t for t in produced - kept_outputs
                if readers_layers.get(t) == {layer}
                and graph.tensors[t].attrs.get("residual") not in keep
                and graph.tensors[t].role == Role.ACTIVATION}
        if drop:
            # saved for this layer's backward anyway: a recompute reads these rather than rebuilding them
            kept = {t for t in produced - drop if t in readers_layers}
            insert_before[bops[0].name] = _reemit(graph, fops, produced - kept, drop, bops)

    if insert_before:
        order: list[str] = []
        added = {n for names in insert_before.values() for n in names}
        for name in graph.order:
            if name in added:
                continue
            order.extend(insert_before.get(name, ()))
            order.append(name)
        graph.order = order
        graph.rewire()
    graph.meta["recompute"] = True
    return graph


def _reemit(graph: Graph, fops: list[Op], produced: set[str], drop: set[str], bops: list[Op]) -> list[str]:
    """Clone the forward ops of one layer needed to rebuild `drop` from what is saved (`produced`: the layer's
    outputs that are not, so must be rebuilt when an op needs them); point the layer's backward at the clones."""
    need = set(drop)
    chosen: list[Op] = []
    for op in reversed(fops):
        if any(o in need for o in op.outputs):
            chosen.append(op)
            need.update(i for i in op.inputs if i in produced)
    chosen.reverse()
    rename = {o: f"{o}@rc" for op in chosen for o in op.outputs}
    names = []
    for op in chosen:
        for o in op.outputs:
            src = graph.tensors[o]
            graph.add_tensor(Tensor(rename[o], src.shape, src.dtype, Role.TEMPORARY, src.space, src.layer,
                                    attrs={**src.attrs, "recomputed_from": o}))
        attrs = {**op.attrs, "recompute": True}
        if "update_history" in attrs:
            attrs["update_history"] = False  # the forward pass already advanced the fp8 amax history
        clone = Op(f"rc:{op.name}", op.kind, [rename.get(i, i) for i in op.inputs], [rename[o] for o in op.outputs],
                   attrs, "backward", op.layer)
        graph.add_op(clone)
        names.append(clone.name)
    for op in chosen:
        for i in op.inputs:
            t = graph.tensors[i]
            if i not in rename and t.role == Role.TEMPORARY:
                t.role = Role.ACTIVATION  # e.g. the embedding output, now a checkpoint read by layer 0's recompute
    for op in bops:
        op.inputs[:] = [rename[i] if i in drop else i for i in op.inputs]
    for t in drop:
        graph.tensors[t].role = Role.TEMPORARY
    return names
