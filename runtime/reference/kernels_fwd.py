"""Forward kernels of the CPU reference backend: one pure function per op kind.

Each takes (inputs, attrs, ctx) and returns the op's outputs in order (None for a workspace output
it does not need). Numerics follow Hugging Face: RMSNorm and softmax in fp32, matmuls in the operands'
common dtype.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from surogate.numba_kernels.lora_merge import lora_fold_tail_ref
from surogate.runtime.reference.common import (
    attention_mask,
    dropout_mask,
    heads,
    linear_scale,
    merge_heads,
    rope_tables,
    rotate_half,
)
from surogate.runtime.reference.dtypes import common

Tensors = list[torch.Tensor | None]


def embedding(x: Tensors, a: dict, ctx: Any) -> Tensors:
    ids, w = x
    return [w[ids.long()]]


def rms_normalize(x: torch.Tensor, eps: float, group: int | None) -> torch.Tensor:
    """x / rms(x) in fp32, over groups of `group` features of the last dim (all of it if None)."""
    xf = x.float()
    if group:
        xf = xf.unflatten(-1, (-1, group))
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return xf.flatten(-2) if group else xf


def rmsnorm(x: Tensors, a: dict, ctx: Any) -> Tensors:
    inp, w = x
    group = a.get("group")
    y = rms_normalize(inp, a["eps"], group).to(inp.dtype)
    if group:
        return [(w * y.unflatten(-1, (-1, group))).flatten(-2)]
    return [w * y]


def linear(x: Tensors, a: dict, ctx: Any) -> Tensors:
    inp, w = x[0], x[1]
    dt = common(inp, w)
    y = inp.to(dt) @ w.to(dt).t()
    if len(x) > 2 and x[2] is not None:
        y = y + x[2].to(dt)
    scale = linear_scale(a, ctx)
    return [y * scale if scale != 1.0 else y]


def rope_table(x: Tensors, a: dict, ctx: Any) -> Tensors:
    """fp32 cos/sin [positions, head_dim/2] exactly as `rope_tables` computes them per position."""
    inv = torch.tensor(a["inv_freq"], dtype=torch.float32)
    freqs = torch.arange(a["positions"], dtype=torch.float32)[:, None] * inv
    scale = a.get("attention_scaling", 1.0)
    return [freqs.cos() * scale, freqs.sin() * scale]


def cos_sin(x: Tensors, a: dict, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin as [B, T, 1, head_dim] from the precomputed tables (inputs 2, 3) or computed on the fly."""
    pos = x[1]
    if len(x) < 4 or x[2] is None:
        return rope_tables(pos, a, dtype)
    idx = pos.long()
    cos, sin = (torch.cat((tab[idx], tab[idx]), dim=-1).to(dtype)[:, :, None] for tab in (x[2], x[3]))
    return cos, sin


def rope(x: Tensors, a: dict, ctx: Any) -> Tensors:
    inp = x[0]
    b, t, w = inp.shape
    cos, sin = cos_sin(x, a, inp.dtype)
    xh = inp.view(b, t, w // a["head_dim"], a["head_dim"])
    return [(xh * cos + rotate_half(xh) * sin).view(b, t, w)]


def attention_probs(q: torch.Tensor, k: torch.Tensor, cu: torch.Tensor, a: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 scores with -inf outside the mask [B, H, T, T], key-expanded k) for GQA heads."""
    b, _, t, _ = q.shape
    s = (q @ k.transpose(-1, -2)).float() * a["scale"]
    return s.masked_fill(~attention_mask(cu, b, t, a.get("causal", True)), float("-inf")), k


def attention(x: Tensors, a: dict, ctx: Any) -> Tensors:
    q, k, v, cu = x
    nh, nkv = a["num_heads"], a["num_kv_heads"]
    qh, kh, vh = heads(q, nh), heads(k, nkv), heads(v, nkv)
    rep = nh // nkv
    kh, vh = kh.repeat_interleave(rep, dim=1), vh.repeat_interleave(rep, dim=1)
    s, _ = attention_probs(qh, kh, cu, a)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None]).to(q.dtype)
    return [merge_heads(p @ vh), lse]


def swiglu(x: Tensors, a: dict, ctx: Any) -> Tensors:
    g, u = x
    return [F.silu(g) * u]


def add(x: Tensors, a: dict, ctx: Any) -> Tensors:
    return [x[0] + x[1].to(x[0].dtype)]


def lora_merge(x: Tensors, a: dict, ctx: Any) -> Tensors:
    """add(base, linear(h, b, scale)): by definition the two kernels it fuses, so its results are theirs, bit for bit."""
    base, h, b = x
    return add([base, linear([h, b], {"scale": a.get("scale", 1.0)}, ctx)[0]], {}, ctx)


def lora_fold_tail(x: Tensors, a: dict, ctx: Any) -> Tensors:
    """A folded projection's weight tail: scale * b in slot `slot` of `slots` (one rounding), zeros elsewhere."""
    (b,) = x
    tail = b.new_zeros(b.shape[0], b.shape[1] * int(a["slots"]))
    lora_fold_tail_ref(b, tail, float(a.get("scale", 1.0)), int(a["slot"]))
    return [tail]


def add_rmsnorm(x: Tensors, a: dict, ctx: Any) -> Tensors:
    """(rmsnorm(add(a, b), w), add(a, b)): by definition the two kernels it fuses, bit for bit."""
    s = add([x[0], x[1]], {}, ctx)[0]
    return [rmsnorm([s, x[2]], a, ctx)[0], s]


def rmsnorm_rope(x: Tensors, a: dict, ctx: Any) -> Tensors:
    """rope(rmsnorm(x, w)) with the tables: by definition the two kernels it fuses, bit for bit."""
    normed = rmsnorm([x[0], x[1]], a, ctx)[0]
    return rope([normed, *x[2:]], a, ctx)


def identity(x: Tensors, a: dict, ctx: Any) -> Tensors:
    return [x[0].clone()]


def dropout(x: Tensors, a: dict, ctx: Any) -> Tensors:
    p = a["p"]
    keep = dropout_mask(x[0].shape, p, a["seed"], ctx.step, getattr(ctx, "token_shard", (0, 1)))
    if not a.get("scaled", True):  # the mask alone: the LoRA GEMM reading it applies 1 / (1 - p)
        return [x[0] * keep]
    # in fp32, rounded once into the output (PEFT's dropout(x.float()) for fp32 adapters on a bf16 x)
    return [x[0].float() * keep / (1.0 - p)]


class CEChunks:
    """The LM head's rows, labels and logits chunk by chunk (the `chunks` attr): full logits never exist at once."""

    def __init__(self, h: torch.Tensor, w: torch.Tensor, labels: torch.Tensor, a: dict,
                 weights: torch.Tensor | None = None) -> None:
        self.rows = h.reshape(-1, h.shape[-1])
        self.w = w.to(self.rows.dtype)
        self.lab = labels.reshape(-1).long()
        # each row's factor in the loss: 0 for ignored labels, else 1 or its `loss_weights` entry
        self.valid = (self.lab != a.get("ignore_index", -100)).float()
        if weights is not None:
            self.valid = self.valid * weights.reshape(-1).float()
        self.n = self.rows.shape[0]
        self.step = -(-self.n // max(1, a.get("chunks", 1)))

    def __iter__(self):
        """(lo, hi, fp32 logits of rows lo..hi)."""
        for lo in range(0, self.n, self.step):
            hi = min(self.n, lo + self.step)
            yield lo, hi, (self.rows[lo:hi] @ self.w.t()).float()

    def loss(self, logits: torch.Tensor, lo: int, hi: int, lse: torch.Tensor) -> torch.Tensor:
        """Rows lo..hi: their log-sum-exp into `lse`; returns the sum of their non-ignored CE."""
        lse[lo:hi] = torch.logsumexp(logits, dim=-1)
        tgt = logits.gather(1, self.lab[lo:hi].clamp(min=0)[:, None])[:, 0]
        return ((lse[lo:hi] - tgt) * self.valid[lo:hi]).sum()


def lm_head_ce(x: Tensors, a: dict, ctx: Any) -> Tensors:
    """Sum of CE over non-ignored rows (times their loss weights) / num_items, row chunk by row chunk: full logits
    never exist at once."""
    h, w, labels, n_items, *weights = x
    ce = CEChunks(h, w, labels, a, *weights)
    lse = torch.empty(ce.n, dtype=torch.float32)
    total = torch.zeros((), dtype=torch.float32)
    for lo, hi, logits in ce:
        total = total + ce.loss(logits, lo, hi, lse)
    return [total / n_items.float().clamp(min=1), lse, None]


KERNELS = {
    "embedding": embedding,
    "rmsnorm": rmsnorm,
    "linear": linear,
    "rope": rope,
    "rope_table": rope_table,
    "attention": attention,
    "swiglu": swiglu,
    "add": add,
    "lora_merge": lora_merge,
    "lora_fold_tail": lora_fold_tail,
    "add_rmsnorm": add_rmsnorm,
    "rmsnorm_rope": rmsnorm_rope,
    "identity": identity,
    "dropout": dropout,
    "lm_head_ce": lm_head_ce,
}
