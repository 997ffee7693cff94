"""Pass `apply_chunking`: split the LM head + cross-entropy and attention backward into row chunks.

`lmhead_chunks: N` sets `chunks=N` on the fused `lm_head_ce` op and its backward (or on
`lm_head_ce_fwd_bwd`, the two in one op: pass `fuse_lm_head_ce`), whose logits
workspace then holds ceil(rows / N) rows instead of all B*T (full logits never exist).
`attn_bwd_chunks: N` sets `chunks=N` on every `attention_bwd` op: query rows are processed N blocks at
a time, so its fp32 dQ workspace is ceil(T / N) rows. Results are unchanged (the reference kernels
loop over the same chunks); only workspace sizes shrink.
"""

from __future__ import annotations

from typing import Any

from surogate.compiler.ir import Graph
from surogate.compiler.ops.vjp import workspace_shape_attention
from surogate.errors import UserError

LM_HEAD_KINDS = ("lm_head_ce", "lm_head_ce_bwd", "lm_head_ce_fwd_bwd")


def _option(cfg: Any, name: str) -> int:
    value = getattr(cfg, name, 1)
    value = 1 if value is None else value
    if not isinstance(value, int) or value < 1:
        raise UserError(f"{name}: must be an integer >= 1, got {value!r}")
    return value


def apply_chunking(graph: Graph, cfg: Any) -> Graph:
    """Set chunk counts on the LM-head and attention-backward ops and resize their workspaces."""
    lm = _option(cfg, "lmhead_chunks")
    att = _option(cfg, "attn_bwd_chunks")
    rows = graph.meta["micro_batch"] * graph.meta["seq_len"]
    notes = graph.meta.setdefault("notes", [])
    if lm > rows:  # (said, not silent: a chunk holds at least one row)
        notes.append(f"lmhead_chunks: {lm} is more than the {rows} token rows of a micro-batch; {rows} chunks are used")
    seq = graph.meta.get("attention_len", graph.meta["seq_len"])  # attention's rows are whole (sequence parallel)
    if att > seq:
        notes.append(f"attn_bwd_chunks: {att} is more than sequence_len {seq}; {seq} chunks are used")
    lm = min(lm, rows)
    att = min(att, seq)
    for op in graph.ops():
        if op.kind in LM_HEAD_KINDS:
            op.attrs["chunks"] = lm
            ws = graph.tensors[op.outputs[-1]]
            graph.update_tensor(ws.name, shape=(-(-rows // lm), ws.shape[1]))
        elif op.kind == "attention_bwd":
            op.attrs["chunks"] = att
            q_shape = graph.tensors[op.inputs[1]].shape
            graph.update_tensor(op.outputs[-1], shape=workspace_shape_attention(q_shape, op.attrs))
    graph.meta.update(lmhead_chunks=lm, attn_bwd_chunks=att)
    return graph
