"""Pass `fuse_lm_head_ce`: the LM head's loss and its backward as one op, so the logits are computed once.

Autodiff writes the loss as a pair: `lm_head_ce(x, W, labels, n) -> (loss, lse, ws)` in the forward and, first
thing in the backward, `lm_head_ce_bwd(x, W, labels, lse, n) -> (dx?, dW?, ws')`, which recomputes every
[rows, vocab] logits chunk from the saved log-sum-exp (the logits never exist whole; keeping them would cost
rows x vocab x 2 bytes, 1.2 GB at Qwen3's vocabulary and 4096 rows). When the backward directly follows the
forward in program order (nothing runs between them: no other loss term, no op that could change x or W), one
op can do both: per row chunk one logits GEMM, one pass that yields loss, lse and the in-place logits gradient,
then the dx / dW GEMMs. That is one [rows, hidden] x [hidden, vocab] GEMM and one read of the logits fewer
per micro-step than the pair; the results are the pair's exactly (same GEMM, same reductions).

The fused op `lm_head_ce_fwd_bwd(x, W, labels, n) -> (loss, lse, dx?, dW?, ws)` takes the forward's place and
name (`lm_head`: the loss op observers and the plan report name), so the forward program still ends at the loss;
evaluation runs the forward-only `lm_head_ce` instead (`runtime.trainer.eval_program`). The backward's
workspace tensor is dropped (the forward's serves both). It runs after `recompute` and before `chunking`, which
sets the row chunks of the fused op like those of the pair.
"""

from __future__ import annotations

from typing import Any

from surogate.compiler.ir import Graph
from surogate.compiler.passes.fusion import _finish, _on

LM_HEAD_CE_ENABLED = True  # module switch: False keeps the lm_head_ce / lm_head_ce_bwd pair
FUSED_KIND = "lm_head_ce_fwd_bwd"
_BWD_ATTRS = ("wrt", "accumulate", "accumulate_into")


def fuse_lm_head_ce(graph: Graph, cfg: Any, *, enabled: bool | None = None) -> Graph:
    """Rewrite every `lm_head_ce` directly followed by its own `lm_head_ce_bwd` into `lm_head_ce_fwd_bwd`."""
    fused = 0
    if _on("fuse_lm_head_ce", LM_HEAD_CE_ENABLED, enabled):
        nxt = dict(zip(graph.order, graph.order[1:], strict=False))
        for fwd in [op for op in graph.ops() if op.kind == "lm_head_ce"]:
            bwd = graph.op(nxt[fwd.name]) if fwd.name in nxt else None
            if bwd is None or not _fusable(graph, fwd, bwd):
                continue
            loss, lse, ws = fwd.outputs
            fwd.kind = FUSED_KIND
            fwd.outputs[:] = [loss, lse, *bwd.outputs[:-1], ws]
            fwd.attrs = {**fwd.attrs, **{k: bwd.attrs[k] for k in _BWD_ATTRS if k in bwd.attrs},
                         "fused_bwd": bwd.name}
            graph.remove_op(bwd.name)
            graph.remove_tensor(bwd.outputs[-1])
            fused += 1
    return _finish(graph, "lm_head_ce_fused", fused)


def _fusable(graph: Graph, fwd: Any, bwd: Any) -> bool:
    """`bwd` is `fwd`'s backward reading exactly its inputs and log-sum-exp, the only reader of that lse, and
    both workspaces have one shape and dtype."""
    if bwd.kind != "lm_head_ce_bwd" or bwd.attrs.get("fwd_op") != fwd.name:
        return False
    x, w, labels, n_items, *weights = fwd.inputs
    _, lse, ws = fwd.outputs
    if bwd.inputs != [x, w, labels, lse, n_items, *weights] or graph.consumers(lse) != [bwd.name]:
        return False
    if any(fwd.attrs.get(k) != bwd.attrs.get(k) for k in ("chunks", "ignore_index")):
        return False
    a, b = graph.tensors[ws], graph.tensors[bwd.outputs[-1]]
    return (a.shape, a.dtype) == (b.shape, b.dtype)
