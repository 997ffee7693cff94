"""Sequence parallelism (`sequence_parallel_size`), DeepSpeed-Ulysses style.

The `sp` ranks of a sequence-parallel group train the same rows, each on its contiguous 1/sp of every row's
tokens: rank i of the group holds tokens [i*T/sp, (i+1)*T/sp). Everything but attention works token by token,
so the graph of one rank is the model's graph at T/sp tokens. Attention needs whole rows: around each attention
op an all-to-all (`seq_to_heads`) trades the rank's token shard of every head for every token of 1/sp of the
heads, attention runs on whole rows (document boundaries `cu_seqlens` of the whole rows, causal as before) for
those heads, and the inverse all-to-all (`heads_to_seq`) brings the output back to the rank's tokens. The
backward is the same trades reversed (each all-to-all's gradient is its inverse). RoPE rotates each token by its
position in its document (the data pipeline's positions, sliced with the tokens), so it runs before the trade.

GQA models whose key/value heads are fewer than sp (sp a multiple of them) send each key/value head to the sp/nkv ranks
whose query heads read it (`repeats`); the backward's inverse all-to-all sums its copies' gradients.

Weight gradients of the sp ranks are partial sums over their tokens; the data-parallel gradient reduction (over
all ranks) adds them. Consecutive ranks form a group (ranks 0..sp-1, sp..2sp-1, ...: one node's GPUs).
"""

from __future__ import annotations

from typing import Any

from surogate.errors import UserError


def sequence_parallel_size(cfg: Any) -> int:
    return int(getattr(cfg, "sequence_parallel_size", 1) or 1)


def check_sequence_parallel(spec: Any, cfg: Any, seq_len: int, router_losses: bool = False) -> int:
    """The group size `sp`, after checking the model and config can be split `sp` ways (UserError naming the field).
    `router_losses`: the model's MoE router losses are on (their statistics are over whole rows)."""
    sp = sequence_parallel_size(cfg)
    if sp == 1:
        return 1
    field = "sequence_parallel_size"
    if seq_len % sp:
        raise UserError(f"{field}: {sp} must divide sequence_len ({seq_len})")
    if spec.num_heads % sp:
        raise UserError(f"{field}: {sp} must divide the model's num_attention_heads ({spec.num_heads}): each rank of "
                        "a sequence-parallel group attends with 1/sequence_parallel_size of the heads")
    nkv = spec.num_kv_heads
    if nkv % sp and sp % nkv:
        raise UserError(f"{field}: {sp} and the model's num_key_value_heads ({nkv}) must divide one another: each "
                        "rank attends with 1/sequence_parallel_size of the key/value heads, or with one of them "
                        "when there are fewer than sequence_parallel_size")
    if router_losses:  # their statistics are over a row's tokens, which no rank holds whole
        raise UserError(f"{field}: the MoE router losses (router_aux_loss_coef, router_z_loss_coef) are not computed "
                        "across a sequence-parallel group in this version; set both to 0 or sequence_parallel_size "
                        "to 1")
    return sp


def sharded_attention(bld: Any, prefix: str, layer: int, q: str, k: str, v: str, cu: str,
                      attrs: dict[str, Any], sp: int, act_dtype: str) -> str:
    """Attention of a rank's token shard: all-to-all q/k/v to whole rows of 1/sp of the heads, attention, and the
    output back to the rank's tokens. Returns the output tensor ([B, T/sp, heads*hd], like attention's)."""
    nh, nkv, hd = attrs["num_heads"], attrs["num_kv_heads"], attrs["head_dim"]
    # GQA with fewer key/value heads than ranks: each is sent to the sp / nkv ranks whose query heads use it (their
    # gradients summed on the way back), so every rank attends with one
    rep = max(1, sp // nkv)
    whole = []
    for name, heads, r in ((q, nh, 1), (k, nkv, rep), (v, nkv, rep)):
        (out,) = bld.op(f"{name}.to_heads", "seq_to_heads", [name], [f"{name}@heads"], layer,
                        {"sp": sp, "heads": heads, "head_dim": hd, **({"repeats": r} if r > 1 else {})})
        whole.append(out)
    shard_attrs = {**attrs, "num_heads": nh // sp, "num_kv_heads": nkv * rep // sp}
    att, _ = bld.op(f"{prefix}.attn", "attention", [*whole, cu], [f"{prefix}.attn@heads", f"{prefix}.attn_lse"],
                    layer, shard_attrs, dtypes=[act_dtype, "fp32"])
    (out,) = bld.op(f"{prefix}.attn.to_seq", "heads_to_seq", [att], [f"{prefix}.attn"], layer,
                    {"sp": sp, "heads": nh, "head_dim": hd})
    return out
