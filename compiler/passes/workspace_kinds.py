"""Per-op-kind sizing of the `workspace` pass: what each cuda-backend kernel allocates beside the arena.

`KindSizes.k_<kind>(op, acc)` records the op's persistent scratch (`self.add`), constants (`self.const`) and
returns its transient bytes, with the size functions the kernels themselves allocate through
(`runtime/backends/cuda_sizes.py`). The walk over the schedule that calls them is `workspace._Walk`.
"""

from __future__ import annotations

import math
from typing import Any

from surogate.compiler.ir import DTYPE_BITS
from surogate.runtime.backends import cuda_sizes as sz


def _isz(dtype: str) -> int:
    return max(1, DTYPE_BITS[dtype] // 8)


class KindSizes:
    """Mixin of `workspace._Walk`: one `k_<kind>` method per op kind the cuda backend runs with its own buffers
    (state: `t`, `add`, `const`, `target`, `upcast`, `rms_seen`, `scalars`, `adamw_keys`, `step_scalar` of the walk)."""

    # -- helpers -------------------------------------------------------------------------------------------
    def _unpacked(self, op: Any) -> int:
        """The executor hands a kernel its 4-bit inputs unpacked, one uint8 code per element (executor.
        unpack_nibbles: the two nibble halves and their interleaved copy: 2 bytes per element at once)."""
        return sum(2 * self.t(n).numel for n in op.inputs if self.t(n).dtype in ("nf4", "fp4_e2m1"))

    def _acc_out(self, op: Any, acc: list[bool], k: int, tag: str) -> None:
        if acc[k]:
            o = self.t(op.outputs[k])
            self.add(sz.acc_buffer(tag, tuple(o.shape), o.dtype))

    def _x_in(self, name: str, other: str, rows: int) -> tuple[str, int]:
        """(dtype the GEMM reads activation `name` in, bytes of a conversion made at the op)."""
        x, o = self.t(name), self.t(other)
        dt = sz.promote(x.dtype, o.dtype)
        if dt == x.dtype:
            return x.dtype, 0
        if name in self.upcast:
            self.add(sz.upcast_slot(rows, x.shape[-1], dt))
            return dt, 0
        return dt, rows * x.shape[-1] * _isz(dt)

    # -- GEMM kinds ----------------------------------------------------------------------------------------
    def _route(self, m: int, k: int, n: int, a: str, b: str, out: str, acc: bool,
               weight: str | None = None) -> sz.GemmRoute:
        """cuda_gemm.gemm_into's route; a split route's scratch buffers are recorded here (`weight`: what b is, a
        weight `W` or `W^T`, whose parts are a buffer of their own)."""
        route = sz.gemm_route(m, k, n, a, b, out, acc, self.target.split_gemm, weight)
        self.add(*route.scratch)
        return route

    def k_linear(self, op: Any, acc: list[bool]) -> int:
        x, w, out = self.t(op.inputs[0]), self.t(op.inputs[1]), self.t(op.outputs[0])
        rows = math.prod(x.shape[:-1])
        cols = out.shape[-1]
        route = self._route(rows, x.shape[-1], cols, x.dtype, w.dtype, out.dtype, acc[0] and len(op.inputs) < 3,
                            sz.split_weight(self.tensors, op.inputs[1], transposed=True))  # b = W^T
        extra = 0
        if route.kind == "promote":
            xd, conv = self._x_in(op.inputs[0], op.inputs[1], rows)
            extra = conv + sz.gemm_transient((rows, x.shape[-1]), xd, (x.shape[-1], cols), w.dtype, out.dtype)
        if len(op.inputs) > 2:
            if acc[0]:
                self.add(sz.linear_bias(rows, cols, out.dtype))
            bias = self.t(op.inputs[2])
            extra += bias.nbytes if bias.dtype != out.dtype else 0
        return extra

    def k_linear_bwd_data(self, op: Any, acc: list[bool]) -> int:
        dy, w, dx = self.t(op.inputs[0]), self.t(op.inputs[1]), self.t(op.outputs[0])
        rows = math.prod(dy.shape[:-1])
        if self._route(rows, dy.shape[-1], w.shape[1], dy.dtype, w.dtype, dx.dtype, acc[0],
                       sz.split_weight(self.tensors, op.inputs[1])).kind != "promote":
            return 0
        return sz.gemm_transient((rows, dy.shape[-1]), dy.dtype, tuple(w.shape), w.dtype, dx.dtype)

    def k_linear_bwd_weight(self, op: Any, acc: list[bool]) -> int:
        dy, x, dw = self.t(op.inputs[0]), self.t(op.inputs[1]), self.t(op.outputs[0])
        rows = math.prod(dy.shape[:-1])
        extra = 0
        if self._route(dy.shape[-1], rows, x.shape[-1], dy.dtype, x.dtype, dw.dtype, acc[0]).kind == "promote":
            xd, conv = self._x_in(op.inputs[1], op.inputs[0], rows)
            extra = conv + sz.gemm_transient((dy.shape[-1], rows), dy.dtype, (rows, x.shape[-1]), xd, dw.dtype)
        if len(op.outputs) > 1:  # dbias: a reduction (in fp32 when the dtypes differ) and its cast
            db = self.t(op.outputs[1])
            extra += rows * dy.shape[-1] * 4 + 2 * db.nbytes if db.dtype != dy.dtype or acc[1] else 0
        return extra

    def k_embedding_bwd(self, op: Any, acc: list[bool]) -> int:
        dy, dw = self.t(op.inputs[0]), self.t(op.outputs[0])
        if op.attrs.get("padding_idx") is not None:
            self.add(sz.embedding_pad_row(dw.shape[1], dw.dtype))
        return math.prod(dy.shape) * _isz(dw.dtype) if dy.dtype != dw.dtype else 0

    def k_add(self, op: Any, acc: list[bool]) -> int:
        a, b, out = self.t(op.inputs[0]), self.t(op.inputs[1]), self.t(op.outputs[0])
        if acc[0] or a.dtype == b.dtype == out.dtype:
            return 0
        n = math.prod(a.shape) * _isz(a.dtype)
        return n if out.dtype == a.dtype else 2 * n

    def k_lora_merge(self, op: Any, acc: list[bool]) -> int:
        """The Numba kernel allocates nothing (an accumulated output: one scratch buffer); fp16 tensors run the
        reference math: the product in the adapters' dtype, its cast and the sum are temporaries."""
        base, h, out = self.t(op.inputs[0]), self.t(op.inputs[1]), self.t(op.outputs[0])
        if all(t.dtype in ("fp32", "bf16") for t in (base, h, self.t(op.inputs[2]), out)):
            self._acc_out(op, acc, 0, "lora_merge_acc")
            return 0
        return out.numel * (_isz(sz.promote(h.dtype, self.t(op.inputs[2]).dtype)) + 2 * _isz(base.dtype))

    # -- row / element-wise kinds --------------------------------------------------------------------------
    def _rows(self, op: Any, x: Any) -> tuple[int, int]:
        g = op.attrs.get("group") or x.shape[-1]
        return math.prod(x.shape) // g, g

    def _rms_bwd(self, fwd_op: Any, x: Any, w_dtype: str, op: Any) -> None:
        rows, h = self._rows(op, x)
        # no rstd scratch: the backward kernel recomputes rstd from x in its own pass
        self.add(sz.rms_dw(fwd_op, h, w_dtype), sz.rms_ws(rows, h, min(rows, self.target.resident_blocks)))

    def k_rmsnorm(self, op: Any, acc: list[bool]) -> int:
        self.add(sz.rms_rstd(self._rows(op, self.t(op.inputs[0]))[0]))
        self._acc_out(op, acc, 0, "rms_acc")
        return 0

    def k_add_rmsnorm(self, op: Any, acc: list[bool]) -> int:
        self.add(sz.rms_rstd(self._rows(op, self.t(op.inputs[0]))[0]))
        return 0

    def k_rmsnorm_rope(self, op: Any, acc: list[bool]) -> int:
        self.add(sz.rms_rstd(self._rows(op, self.t(op.inputs[0]))[0]))  # rows: heads (group = head_dim)
        return 0

    def k_rmsnorm_bwd(self, op: Any, acc: list[bool]) -> int:
        self._rms_bwd(op.attrs.get("fwd_op"), self.t(op.inputs[1]), self.t(op.inputs[2]).dtype, op)
        self.rms_seen.add(op.attrs.get("fwd_op"))
        return 0

    k_rmsnorm_rope_bwd = k_rmsnorm_bwd  # the same kernel (rope's backward is its prologue), inputs in the same places

    def k_rmsnorm_bwd_weight(self, op: Any, acc: list[bool]) -> int:
        x, dweight = self.t(op.inputs[1]), self.t(op.outputs[0])
        h = self._rows(op, x)[1]
        if op.attrs.get("fwd_op") not in self.rms_seen:  # no rmsnorm_bwd summed dweight this run
            self.const(("ones", h, x.dtype), h * _isz(x.dtype))
            self.add(sz.rms_ds(tuple(x.shape), x.dtype))
            self._rms_bwd(None, x, x.dtype, op)
        return h * _isz(dweight.dtype) if acc[0] else 0

    def _inv_freq(self, op: Any) -> None:
        inv = tuple(float(f) for f in op.attrs["inv_freq"])
        self.const(("inv_freq", inv), 4 * len(inv))

    def _rope(self, op: Any, acc: list[bool]) -> int:
        self._acc_out(op, acc, 0, "rope_acc")
        if len(op.inputs) < 4:
            self._inv_freq(op)
        return 0

    k_rope = k_rope_bwd = _rope

    def k_rope_table(self, op: Any, acc: list[bool]) -> int:
        self._inv_freq(op)
        n = 4 * int(op.attrs["positions"]) * len(op.attrs["inv_freq"])
        key = (tuple(float(f) for f in op.attrs["inv_freq"]), int(op.attrs["positions"]),
               float(op.attrs.get("attention_scaling", 1.0)))
        self.const(("rope_table", *key, "cos"), n)
        self.const(("rope_table", *key, "sin"), n)
        return 0

    def k_swiglu(self, op: Any, acc: list[bool]) -> int:
        self._acc_out(op, acc, 0, "swiglu_acc")
        return 0

    def k_swiglu_bwd(self, op: Any, acc: list[bool]) -> int:
        wrt = list(op.attrs.get("wrt", (0, 1)))
        for k, i in enumerate(wrt):
            self._acc_out(op, acc, k, f"swiglu_d{i}")
        for i in (0, 1):
            if i not in wrt:
                x = self.t(op.inputs[1 + i])
                self.add(sz.acc_buffer(f"swiglu_d{i}", tuple(x.shape), x.dtype))
        return 0

    def _dropout(self, op: Any, acc: list[bool]) -> int:
        self._acc_out(op, acc, 0, "dropout_acc")
        if float(op.attrs["p"]) != 0.0:
            self.step_scalar = 8  # ctx.step on the device (int64 [1])
        return 0

    k_dropout = k_dropout_bwd = _dropout

    def k_dequant(self, op: Any, acc: list[bool]) -> int:
        out = self.t(op.outputs[0])
        fmt = op.attrs["format"]
        if fmt in ("nf4", "fp4", "fp4_block") and out.dtype in ("fp32", "bf16"):
            self._acc_out(op, acc, 0, "dequant_acc")
            self.const(("quant_table", "NF4_CODE" if fmt == "nf4" else "E2M1"), 64)
            return sum(self.t(n).numel * 4 for n in op.inputs[1:3]) if fmt != "nf4" else 0
        return math.prod(out.shape) * (8 + _isz(out.dtype))  # reference math: fp32 values and their cast

    # -- FP8 recipe (cuda_fp8) -----------------------------------------------------------------------------
    def _fp8_native(self, op: Any) -> bool:
        from surogate.runtime.backends.cuda_fp8 import plan_op_is_native

        return plan_op_is_native(op, self.tensors, self.target.cuda, self.target.capability)

    def k_quantize(self, op: Any, acc: list[bool]) -> int:
        if not self._fp8_native(op):
            self.unsized.add(op.kind)  # the reference math (fp4 formats, ZeRO-3 shard writes)
            return 0
        self.add(sz.fp8_amax_slot())
        return 0

    def k_qlinear(self, op: Any, acc: list[bool]) -> int:
        if not self._fp8_native(op):
            self.unsized.add(op.kind)
            return 0
        self._acc_out(op, acc, 0, "fp8_gemm_acc")
        return 0

    def _fp8_grad(self, op: Any) -> tuple[int, int]:
        dy = self.t(op.inputs[0])
        rows, cols = math.prod(dy.shape[:-1]), dy.shape[-1]
        self.add(*sz.fp8_grad_codes(rows, cols), sz.fp8_amax_slot())
        return rows, cols

    def k_qlinear_bwd_data(self, op: Any, acc: list[bool]) -> int:
        if not self._fp8_native(op):
            self.unsized.add(op.kind)
            return 0
        rows, n = self._fp8_grad(op)
        self.add(sz.fp8_transposed("fp8_w_t", n, self.t(op.inputs[1]).numel // n))
        self._acc_out(op, acc, 0, "fp8_gemm_acc")
        return 0

    def k_qlinear_bwd_weight(self, op: Any, acc: list[bool]) -> int:
        if not self._fp8_native(op):
            self.unsized.add(op.kind)
            return 0
        rows, n = self._fp8_grad(op)
        self.add(sz.fp8_transposed("fp8_dy_t", rows, n), sz.fp8_transposed("fp8_x_t", rows, self.t(op.inputs[1]).shape[-1]))
        self._acc_out(op, acc, 0, "fp8_gemm_acc")
        return rows * n * 4 if op.attrs.get("has_bias") else 0  # the bias gradient's fp32 temporary

    # -- fused LM head + cross-entropy ---------------------------------------------------------------------
    def _ce(self, op: Any, ws_name: str, with_loss: bool) -> tuple[int, int]:
        h, ws = self.t(op.inputs[0]), self.t(ws_name)
        rows = math.prod(h.shape[:-1])
        if ws.dtype != h.dtype and _isz(ws.dtype) < _isz(h.dtype):
            self.add(sz.ce_logits(math.prod(ws.shape), h.dtype))
        self.add(*sz.ce_rows(rows), sz.CE_INV_ITEMS)
        if with_loss:
            self.add(sz.ce_loss_rows(rows))
        n_items = self.t(op.inputs[-1])
        return rows, (4 if n_items.dtype != "fp32" else 0)

    def k_lm_head_ce(self, op: Any, acc: list[bool]) -> int:
        return self._ce(op, op.outputs[2], True)[1]

    def k_lm_head_ce_bwd(self, op: Any, acc: list[bool]) -> int:
        return self._ce_grads(op, op.outputs[: len(op.attrs["wrt"])], with_loss=False)

    def k_lm_head_ce_fwd_bwd(self, op: Any, acc: list[bool]) -> int:
        return self._ce_grads(op, op.outputs[2:-1], with_loss=True)

    def _ce_grads(self, op: Any, grads: list[str], with_loss: bool) -> int:
        """The backward's (or the fused op's) scratch and the transients of its dlogits GEMMs; `grads` are the
        outputs of the gradients `op.attrs["wrt"]` names, in its order."""
        ws = self.t(op.outputs[-1])
        rows, extra = self._ce(op, op.outputs[-1], with_loss)
        h, w = self.t(op.inputs[0]), self.t(op.inputs[1])
        tile = (min(rows, ws.shape[0]), min(w.shape[0], ws.shape[1]))
        outs = dict(zip(op.attrs["wrt"], grads, strict=True))
        if 0 in outs:
            extra += sz.gemm_transient(tile, h.dtype, (tile[1], h.shape[-1]), w.dtype, self.t(outs[0]).dtype)
        if 1 in outs:
            extra += sz.gemm_transient((tile[1], tile[0]), h.dtype, (tile[0], h.shape[-1]), h.dtype,
                                       self.t(outs[1]).dtype)
        return extra

    # -- attention -----------------------------------------------------------------------------------------
    def _attn_dims(self, op: Any, q_name: str) -> tuple[int, int, int, int, int, str]:
        q = self.t(q_name)
        return (q.shape[0], q.shape[1], int(op.attrs["num_heads"]), int(op.attrs["num_kv_heads"]),
                int(op.attrs["head_dim"]), q.dtype)

    def _bias(self, b: int, t: int, dtype: str) -> None:
        self.add(*sz.attn_bias(b, t, dtype))
        self.const(("tokens", b * t), 4 * b * t)
        self.const(("tril", t), t * t)

    def k_seq_to_heads(self, op: Any, acc: list[bool]) -> int:
        """Sequence parallelism's all-to-all (runtime/distributed/sequence.py): the chunks sent (a contiguous copy)
        and received, then the received chunks reordered into the output's layout (the executor copies it into the
        arena): two of the output's size live at once; three with `repeats` (the repeated heads are a copy too)."""
        o = self.t(op.outputs[0])
        return (3 if op.attrs.get("repeats", 1) > 1 else 2) * math.prod(o.shape) * _isz(o.dtype)

    def k_heads_to_seq(self, op: Any, acc: list[bool]) -> int:
        """As seq_to_heads (two of the input's size); with `repeats` the received heads' copies are then summed."""
        x = self.t(op.inputs[0])
        n = math.prod(x.shape) * _isz(x.dtype)
        rep = int(op.attrs.get("repeats", 1))
        return 2 * n + (n // rep if rep > 1 else 0)

    def k_attention(self, op: Any, acc: list[bool]) -> int:
        b, t, nh, nkv, hd, dt = self._attn_dims(op, op.inputs[0])
        if self.target.flash(dt):
            return sz.flash_fwd_bytes(b * t, nh, hd, _isz(dt))
        self._bias(b, t, dt)
        if nh != nkv:
            k = self.t(op.inputs[1])
            self.add(sz.attn_expand("attn_k", b, nh, t, hd, k.dtype), sz.attn_expand("attn_v", b, nh, t, hd, k.dtype))
        lse_t = -(-t // 32) * 32 if self.target.cuda else t
        return b * nh * t * hd * _isz(dt) + b * nh * lse_t * 4

    def k_attention_bwd(self, op: Any, acc: list[bool]) -> int:
        b, t, nh, nkv, hd, dt = self._attn_dims(op, op.inputs[1])
        rep, wrt = nh // nkv, list(op.attrs["wrt"])
        chunks = int(op.attrs.get("chunks", 1))
        if self.target.flash(dt):
            self.add(sz.attn_lse_native(nh, b * t))
            self.const(("flash_rng",), 16)
            seqs = min(b * t, sz.MIN_DOC_SLOTS)  # cu_slots - 1 for a micro-batch of <= 16 documents
            if len(op.outputs) > len(wrt):
                budget = self.t(op.outputs[len(wrt)]).nbytes
                chunks = sz.flash_bwd_chunks(b * t, seqs, nh, nkv, hd, budget, chunks, self.target.sms)
            groups = max(g1 - g0 for g0, g1 in sz.chunks(nkv, chunks))
            return groups * sz.flash_bwd_bytes_per_group(b * t, seqs, rep, hd)
        self._bias(b, t, dt)
        self.const(("philox0",), 8)
        k = self.t(op.inputs[2])
        parts = sz.chunks(nkv, chunks)
        for g0, g1 in parts:
            if rep > 1:
                self.add(sz.attn_expand("attn_kc", b, (g1 - g0) * rep, t, hd, k.dtype),
                         sz.attn_expand("attn_vc", b, (g1 - g0) * rep, t, hd, k.dtype))
            if self.target.cuda:
                self.add(sz.attn_lse_pad(b, (g1 - g0) * rep, t))
        g = max(g1 - g0 for g0, g1 in parts)
        per_chunk = (3 * g * rep + (2 * g if rep > 1 else 0)) * b * t * hd * _isz(dt)
        return per_chunk * (2 if len(parts) > 1 else 1)  # the last chunk's parts live through the next call

    # -- optimizer -----------------------------------------------------------------------------------------
    def k_adamw8bit_step(self, op: Any, acc: list[bool]) -> int:
        key = sz.adamw_scalar_key(op.attrs, op.inputs[-1] == "grad_clip_scale")
        if key not in self.adamw_keys:  # one buffer per distinct setting (cuda_optim.adamw8bit_step)
            self.adamw_keys.add(key)
            self.scalars += 4 * sz.ADAMW_SCALARS
        return 0

    def k_normuon_step(self, op: Any, acc: list[bool]) -> int:
        ins = [self.t(n) for n in op.inputs]
        k = 2 if ins[3].shape == ins[0].shape else 1
        target, grad = ins[1] if k == 2 else ins[0], ins[k]
        rows, cols = target.shape[-2], target.shape[-1]
        self.add(*sz.normuon(rows, cols, tuple(grad.shape) if len(ins) > k + 3 else None))
        self.scalars += 4 * sz.NORMUON_SCALARS
        m = min(rows, cols)  # Newton-Schulz in bf16: x and its rescaled / updated copies, the m x m products
        return 2 * (5 * rows * cols + 4 * m * m)

    def k_grad_norm(self, op: Any, acc: list[bool]) -> int:
        self.add(*sz.GRAD_NORM)
        return 0

    def k_grad_clip_scale(self, op: Any, acc: list[bool]) -> int:
        x = self.t(op.inputs[0])
        return 4 * x.numel if x.dtype != "fp32" else 0
