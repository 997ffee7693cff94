"""Sizes of the `cuda` backend's own device buffers, as pure functions of shapes and dtype names (no torch).

The backend's kernels allocate their scratch buffers through these functions (`CudaState.alloc(spec)`), and
the compiler's `workspace` pass calls the same functions over the plan's schedule to predict what the backend
holds beside the arena (compiler/passes/workspace.py): the two cannot drift apart.

A scratch buffer is a `Spec` (tag, shape, dtype name); `CudaState` keeps one buffer per distinct spec (and
device) for the executor's lifetime, so the backend's persistent bytes are the sum over the distinct specs the
schedule asks for. Transient bytes (torch temporaries created inside a kernel call, flash attention's own
allocations, the cuBLAS workspace) are sized here too, per call.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

from surogate.compiler.ir import DTYPE_BITS


class Spec(NamedTuple):
    """One scratch buffer: CudaState keys it by (tag, shape, dtype) and allocates it once."""

    tag: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_BITS[self.dtype] // 8


@dataclass(frozen=True)
class Target:
    """What the backend runs on: a GPU (flash attention for bf16/fp16, `sms` multiprocessors) or CPU tensors
    under the Numba simulator (SDPA attention, 2 resident blocks)."""

    cuda: bool = True
    sms: int = 132  # H100 SXM
    simulator: bool = False
    capability: tuple[int, int] = (9, 0)
    bf16x3: bool | None = None  # split GEMMs (None: on a GPU); tests force them on under the simulator

    @property
    def resident_blocks(self) -> int:
        """numba_kernels._device._max_resident_blocks on this target."""
        return 2 if self.simulator else self.sms * 8

    @property
    def split_gemm(self) -> bool:
        """Whether mixed bf16/fp32 GEMMs run as bf16x3 split GEMMs (`gemm_route`): on a GPU (torch's
        mm out_dtype), unless `bf16x3` says otherwise or SUROGATE_SPLIT_GEMM=0 turns it off."""
        return split_gemm_enabled() and (self.cuda if self.bf16x3 is None else self.bf16x3)

    def flash(self, dtype: str) -> bool:
        """cuda_attention.use_flash on this target (SUROGATE_CUDA_ATTENTION=sdpa turns it off)."""
        return (self.cuda and dtype in ("bf16", "fp16")
                and os.environ.get("SUROGATE_CUDA_ATTENTION", "auto") != "sdpa")


FLOATS = ("fp16", "bf16", "fp32")


def promote(a: str, b: str) -> str:
    """torch.promote_types on IR dtype names (floats; bf16 with fp16 gives fp32)."""
    if a == b:
        return a
    if a in FLOATS and b in FLOATS:
        return "fp32" if "fp32" in (a, b) or {a, b} == {"bf16", "fp16"} else a
    return a if DTYPE_BITS.get(a, 0) >= DTYPE_BITS.get(b, 0) else b


def nbytes(shape: Iterable[int], dtype: str) -> int:
    return math.prod(tuple(shape)) * DTYPE_BITS[dtype] // 8


# -- accumulation and shared conversions (the rules CudaState applies) --------------------------------------
def accumulates(op: Any, index: int, first_writer: dict[str, int], tensors: dict[str, Any]) -> list[bool]:
    """Per output of `op` (at schedule `index`): whether the backend adds into it (the executor's rule)."""
    from surogate.compiler.ir import Role

    acc = op.attrs.get("accumulate_into")
    if acc is None:  # back-half ops: `accumulate` adds into every output
        acc = op.outputs if op.attrs.get("accumulate") else ()
    acc = set(acc)
    return [name in acc and (tensors[name].role is Role.GRADIENT or first_writer[name] != index)
            for name in op.outputs]


def upcast_names(ops: Iterable[Any], tensors: dict[str, Any], wider: Callable[[str, str], bool]) -> set[str]:
    """Activations that two or more mixed-dtype GEMMs read in a wider dtype (the input of q/k/v's or gate/up's
    fp32 LoRA adapters), written by exactly one op per run: worth converting once per run. `wider(x, other)`:
    whether x's dtype promotes to a different one against other's."""
    readers: dict[str, int] = {}
    writers: dict[str, int] = {}
    for op in ops:
        for name in op.outputs:
            writers[name] = writers.get(name, 0) + 1
        if op.kind in ("linear", "linear_bwd_weight") and len(op.inputs) >= 2:
            x, other = (op.inputs[0], op.inputs[1]) if op.kind == "linear" else (op.inputs[1], op.inputs[0])
            if wider(tensors[x].dtype, tensors[other].dtype):
                readers[x] = readers.get(x, 0) + 1
    return {n for n, k in readers.items() if k >= 2 and writers.get(n, 0) == 1}


def upcast_slot(rows: int, cols: int, dtype: str) -> Spec:
    return Spec("upcast", (rows, cols), dtype)


# -- per-kernel scratch ------------------------------------------------------------------------------------
def acc_buffer(tag: str, shape: tuple[int, ...], dtype: str) -> Spec:
    """Where a kernel writes an output it then adds into the planned view."""
    return Spec(tag, tuple(shape), dtype)


def linear_bias(rows: int, cols: int, dtype: str) -> Spec:
    return Spec("linear_bias", (rows, cols), dtype)


def embedding_pad_row(hidden: int, dtype: str) -> Spec:
    return Spec("embedding_pad_row", (hidden,), dtype)


def rms_rstd(rows: int) -> Spec:
    return Spec("rms_rstd", (rows,), "fp32")


def rms_dw(fwd_op: Any, hidden: int, dtype: str) -> Spec:
    return Spec(f"rms_dw:{fwd_op}", (hidden,), dtype)


RMS_ROWS_PER_PART = 8  # numba_kernels.rmsnorm.ROWS_PER_PART


def rms_ws(rows: int, hidden: int, grid: int) -> Spec:
    """fp32 dweight partials of the RMSNorm backward: one row per block of its grid, a block per 8 rows up to
    `grid` (the resident-block cap, or the backward's own block count)."""
    return Spec("rms_ws", (min(math.ceil(rows / RMS_ROWS_PER_PART), grid), hidden), "fp32")


def rms_ds(shape: tuple[int, ...], dtype: str) -> Spec:
    return Spec("rms_ds", tuple(shape), dtype)


def ce_logits(numel: int, dtype: str) -> Spec:
    return Spec("ce_logits", (numel,), dtype)


def ce_rows(rows: int) -> list[Spec]:
    """Row statistics of the fused LM-head cross-entropy (running max, sum, target logit)."""
    return [Spec("ce_m", (rows,), "fp32"), Spec("ce_s", (rows,), "fp32"), Spec("ce_tgt", (rows,), "fp32")]


def ce_loss_rows(rows: int) -> Spec:
    return Spec("ce_loss_rows", (rows,), "fp32")


CE_INV_ITEMS = Spec("ce_inv_items", (), "fp32")


def attn_bias(b: int, t: int, dtype: str) -> list[Spec]:
    """The SDPA path's block-diagonal causal bias and the two buffers it is built from."""
    return [Spec("attn_bias", (b, 1, t, t), dtype), Spec("attn_doc", (b * t,), "int64"),
            Spec("attn_same", (b, t, t), "bool")]


def attn_expand(tag: str, b: int, heads: int, t: int, hd: int, dtype: str) -> Spec:
    return Spec(tag, (b, heads, t, hd), dtype)


def attn_lse_pad(b: int, heads: int, t: int) -> Spec:
    return Spec("attn_lse_pad", (b, heads, -(-t // 32) * 32), "fp32")


def attn_lse_native(nh: int, total: int) -> Spec:
    return Spec("attn_lse_native", (nh, total), "fp32")


def chunks(n: int, parts: int) -> list[tuple[int, int]]:
    """[lo, hi) ranges of `parts` near-equal chunks of n (the attention backward's head groups)."""
    parts = max(1, min(int(parts), n))
    step = -(-n // parts)
    return [(lo, min(n, lo + step)) for lo in range(0, n, step)]


def normuon(rows: int, cols: int, grad_shape: tuple[int, ...] | None) -> list[Spec]:
    """NorMuon's fp32 scratch: the clipped gradient (with clipping), the update, row sums, the scale."""
    specs = [Spec("nm_grad", tuple(grad_shape), "fp32")] if grad_shape is not None else []
    return specs + [Spec("nm_update", (rows, cols), "fp32"), Spec("nm_rowsq", (rows,), "fp32"),
                    Spec("nm_scale", (1,), "fp32")]


GRAD_NORM = [Spec("gn_acc", (), "fp32"), Spec("gn_part", (), "fp32")]
ADAMW_SCALARS = 8  # fp32 hyperparameters per adamw8bit_step buffer (CudaState.scalars; see adamw_scalar_key)

NORMUON_SCALARS = 2


def adamw_scalar_key(attrs: dict, clipped: bool) -> tuple:
    """The key of an 8-bit AdamW op's hyperparameter buffer: ops with equal settings share one (one refresh and
    one clip copy per step for all of them); the planner counts the distinct keys."""
    return ("adamw", *(float(attrs[k]) for k in ("lr", "beta1", "beta2", "epsilon", "weight_decay")), clipped)


# -- transients --------------------------------------------------------------------------------------------
TILE_ELEMENTS = 1 << 23  # output elements per block of a mixed-dtype GEMM (16 MiB of bf16)


def gemm_transient(a: tuple[int, int], a_dtype: str, b: tuple[int, int], b_dtype: str, out_dtype: str) -> int:
    """Peak bytes of torch temporaries of `cuda_gemm.gemm_into(out, a, b)`: none when all three dtypes agree;
    else b in the compute dtype, a block of a's rows in it, and the block's product when out has another dtype
    (a rebound block's new tensor exists before the old one is freed: two blocks when there are several)."""
    if a_dtype == b_dtype == out_dtype:
        return 0
    dt = promote(a_dtype, b_dtype)
    rows, cols = a[0], b[1]
    step = max(1, TILE_ELEMENTS // max(1, cols))
    live = 2 if rows > step else 1
    block = min(rows, step)
    total = nbytes(b, dt) if b_dtype != dt else 0
    if a_dtype != dt:
        total += live * block * a[1] * DTYPE_BITS[dt] // 8
    if out_dtype != dt:
        total += live * block * cols * DTYPE_BITS[dt] // 8
    return total


# -- bf16x3 split GEMMs (runtime/backends/cuda_split_gemm.py) ------------------------------------------------
SPLIT_MAX_DIM = 256  # the small dim (a LoRA rank) split 3x; larger ones keep the promoted fp32 GEMM
SPLIT_MAX_ELEMENTS = TILE_ELEMENTS  # the largest split scratch buffer (bigger GEMMs keep the promoted path)


SPLIT_CACHE_TAG = "split_cache"  # a weight's bf16x3 parts, kept for the rest of the program run


def split_gemm_enabled() -> bool:
    """SUROGATE_SPLIT_GEMM=0 turns the split GEMMs off (the promoted fp32 path, for comparisons)."""
    return os.environ.get("SUROGATE_SPLIT_GEMM", "auto").lower() not in ("0", "off", "false", "no")


def split_cache_mode() -> str:
    """How an fp32 weight's bf16x3 parts are kept (SUROGATE_SPLIT_CACHE, to A/B the ways): "step" (default) in a
    buffer of its own, split again only when the weight is written (the optimizer step, a load), so micro-steps
    read them without splitting; "run": split at the weight's first GEMM of each program run; "off" (or 0):
    split at every GEMM into one scratch for all weights of a shape."""
    value = os.environ.get("SUROGATE_SPLIT_CACHE", "auto").lower()
    if value in ("0", "off", "false", "no"):
        return "off"
    return "run" if value == "run" else "step"


def split_cache_enabled() -> bool:
    """Whether fp32 weights keep their parts in buffers of their own (`split_cache_mode` is not "off")."""
    return split_cache_mode() != "off"


class GemmRoute(NamedTuple):
    """How `cuda_gemm.gemm_into` computes out (=|+=) alpha * a @ b, and the scratch buffers it holds for it.

    same: one GEMM in the common dtype. promote: today's path (operands converted to the promoted dtype; its
    temporaries are `gemm_transient`). out_fp32: bf16 x bf16 into an fp32 output (a GEMM with fp32 output; a
    product buffer when it accumulates). split_n: the fp32 operand's non-reduction dim is small: its three bf16
    parts side by side, one bf16 GEMM into an fp32 product, the three slices summed into out. split_k: the
    reduction dim is small: the parts stacked along it, the bf16 operand repeated 3x, one bf16 GEMM."""

    kind: str
    wide: str = ""  # which operand ("a" / "b") is fp32 (split routes)
    scratch: tuple[Spec, ...] = ()

    @property
    def cached(self) -> bool:
        """Whether the fp32 operand's parts (scratch[0]) are a weight's own buffer, split once per program run."""
        return bool(self.scratch) and self.scratch[0].tag.startswith(SPLIT_CACHE_TAG)


def split_weight(tensors: Any, name: str, transposed: bool = False) -> str:
    """`gemm_route`'s `weight` for a GEMM whose b is weight tensor `name` (`transposed`: b = name^T): the weight it
    reads, i.e. itself or, for a ZeRO-3 gathered copy or an offload staging copy, the tensor it copies (equal
    within a run, so that every copy of one weight shares one buffer), `^T` appended for the transpose."""
    seen = set()
    while name not in seen:
        seen.add(name)
        attrs = tensors[name].attrs
        source = attrs.get("gathered_of") or attrs.get("staging_of")
        if not source or source not in tensors:
            break
        name = source
    return f"{name}^T" if transposed else name


def _transposed(label: str) -> str:
    return label[:-2] if label.endswith("^T") else f"{label}^T"


def gemm_route(m: int, k: int, n: int, a_dtype: str, b_dtype: str, out_dtype: str, accumulate: bool,
               split: bool, weight: str | None = None) -> GemmRoute:
    """The route of a [m, k] @ [k, n] GEMM (shared by the backend and the workspace pass). `split`: whether the
    device runs bf16 GEMMs with an fp32 output (Target.split_gemm; the backend's probe). `weight`: what b is when
    it is a weight (constant through a program run), its plan name `W` or `W^T` for its transpose: the parts get
    a buffer of their own (`split_cache:W` holding W's parts, `split_cache:W^T` its transpose's), split at the
    first GEMM of a run that reads them and read by the others, unless SUROGATE_SPLIT_CACHE=0.

    A split_n route splits b^T, a split_k route b: a LoRA A [r, in] is split as itself by x @ A^T (split_n) and by
    dh @ A (split_k), a B [out, r] as B^T by h @ B^T (split_k) and by dy @ B (split_n): one buffer per weight."""
    if a_dtype == b_dtype == out_dtype:
        return GemmRoute("same")
    if not split or out_dtype not in ("bf16", "fp32"):
        return GemmRoute("promote")
    if a_dtype == b_dtype == "bf16":  # out fp32: no bf16 rounding of the product any more
        if not accumulate:
            return GemmRoute("out_fp32")
        if m * n <= SPLIT_MAX_ELEMENTS:
            return GemmRoute("out_fp32", scratch=(Spec("split_prod", (m, n), "fp32"),))
        return GemmRoute("promote")
    if {a_dtype, b_dtype} != {"bf16", "fp32"}:
        return GemmRoute("promote")
    wide = "a" if a_dtype == "fp32" else "b"
    small, big = (m, n) if wide == "a" else (n, m)
    cache = bool(weight) and wide == "b" and split_cache_enabled()
    if small <= SPLIT_MAX_DIM and max(3 * small * k, 3 * small * big) <= SPLIT_MAX_ELEMENTS:
        prod = (3 * m, n) if wide == "a" else (m, 3 * n)
        parts = f"{SPLIT_CACHE_TAG}:{_transposed(weight)}" if cache else "split_parts"  # b^T's parts
        return GemmRoute("split_n", wide, (Spec(parts, (3 * small, k), "bf16"), Spec("split_prod", prod, "fp32")))
    parts = f"{SPLIT_CACHE_TAG}:{weight}" if cache else "split_parts"  # b's parts
    if k <= SPLIT_MAX_DIM and out_dtype == "bf16" and 3 * k * max(m, n) <= SPLIT_MAX_ELEMENTS:
        rows, cols = (k, m) if wide == "a" else (k, n)  # the fp32 operand, reduction dim first
        other = n if wide == "a" else m
        return GemmRoute("split_k", wide, (Spec(parts, (3 * rows, cols), "bf16"),
                                           Spec("split_rep", (3 * k, other) if wide == "a" else (other, 3 * k),
                                                "bf16")))
    return GemmRoute("promote")


def cublas_workspace(capability: tuple[int, int], env: str | None = None) -> int:
    """Bytes of torch's cuBLAS workspace per (handle, stream), which cuBLASLt shares by default
    (torch CublasHandlePool.cpp: CUBLAS_WORKSPACE_CONFIG ':SIZE_KiB:COUNT' pairs, default ':4096:8' = 32 MiB on
    SM90+, ':4096:2:16:8' below)."""
    import re

    env = os.environ.get("CUBLAS_WORKSPACE_CONFIG") if env is None else env
    if env:
        pairs = re.findall(r":([0-9]+):([0-9]+)", env)
        if pairs:
            return sum(int(s) * 1024 * int(c) for s, c in pairs)
    return 4096 * 8 * 1024 if capability[0] >= 9 else 4096 * 1024 * 2 + 16 * 1024 * 8


# -- flash attention ---------------------------------------------------------------------------------------
MIN_DOC_SLOTS = 16  # the smallest cu_seqlens bucket flash attention gets (cuda_attention.doc_slots)


def flash_bwd_bytes_per_group(total: int, seqs: int, rep: int, hd: int) -> int:
    """Device bytes `_flash_attention_backward` allocates per key/value group of a call (torch's flash_api.cpp,
    mha_varlen_bwd): fp32 dQ accumulator and softmax_d over total + 128 * seqs rows, dq/dk/dv, the GQA-expanded
    dk/dv, and the contiguous copies of dout and out a head slice needs."""
    rows = total + 128 * seqs
    hdr = -(-hd // 32) * 32 if hd <= 128 else -(-hd // 64) * 64
    accum = rows * rep * hdr * 4 + rows * rep * 4
    grads = total * rep * hd * 2 + 2 * total * hd * 2 + (2 * total * rep * hd * 2 if rep > 1 else 0)
    copies = 2 * total * rep * hd * 2
    return accum + grads + copies


def flash_bwd_chunks(total: int, seqs: int, nh: int, nkv: int, hd: int, budget: int, planned: int,
                     sms: int = 132, waves: int | None = None) -> int:
    """Chunks of whole key/value groups for the flash backward: at least the plan's, and as many as keep one
    call's own allocations within the plan's attention workspace (`budget` bytes, which flash cannot use)
    while each call still fills the GPU (flash's backward runs one block per 128 keys per head: a call
    keeps >= `waves` blocks per multiprocessor; SUROGATE_FLASH_BWD_WAVES, default 2, 0 = memory only)."""
    if waves is None:
        from surogate.runtime.distributed.comm import env_int

        waves = env_int("SUROGATE_FLASH_BWD_WAVES", 2)  # (junk: an error naming the variable)
    rep = nh // nkv
    per_group = flash_bwd_bytes_per_group(total, seqs, rep, hd)
    by_memory = budget // max(1, per_group)
    by_occupancy = -(-waves * sms // max(1, rep * -(-total // 128)))
    groups = max(1, min(nkv, max(by_memory, by_occupancy)))
    return max(int(planned), -(-nkv // groups))


def flash_inplace() -> bool:
    """This torch has the varlen flash forward that writes into a given output
    (`aten._flash_attention_forward_no_dropout_inplace`): the attention kernel passes the plan's view and no
    output temporary exists. `SUROGATE_FLASH_INPLACE=0` keeps the returning op (output copied into the view)."""
    import torch

    return (hasattr(torch.ops.aten, "_flash_attention_forward_no_dropout_inplace")
            and os.environ.get("SUROGATE_FLASH_INPLACE", "1") != "0")


def flash_fwd_bytes(total: int, nh: int, hd: int, itemsize: int, inplace: bool | None = None) -> int:
    """What the varlen flash forward allocates (the kernel then copies it into the plan's views): the fp32 softmax
    LSE [nh, total] (flash_api.cpp mha_varlen_fwd) and its rng state, plus the output [total, nh, hd] unless it is
    written in place (`flash_inplace`, the default when None)."""
    inplace = flash_inplace() if inplace is None else inplace
    return (0 if inplace else total * nh * hd * itemsize) + nh * total * 4 + 16


# -- FP8 tensor-core GEMMs (recipe fp8_hybrid; runtime/backends/cuda_fp8.py) -------------------------------
FP8_CAPABILITY = (8, 9)  # cuBLASLt FP8 GEMMs: Ada and newer
FP8_ALIGN = 16  # torch._scaled_mm on a GPU: every dim of both operands a multiple of 16
FP8_FORMATS = {"fp8_e4m3": "e4m3", "fp8_e5m2": "e5m2"}  # grad_format -> numba_kernels.fp8 format


def fp8_gemm_enabled() -> bool:
    """SUROGATE_FP8_GEMM=0 runs the fp8 recipe's matmuls as the reference math (dequantize + fp32 GEMM): the A/B."""
    return os.environ.get("SUROGATE_FP8_GEMM", "1") != "0"


def fp8_native(fmt: str | None, dims: Iterable[int], dtypes: Iterable[str], cuda: bool,
               capability: tuple[int, int]) -> bool:
    """Whether an fp8_tensor quantize / qlinear op runs the backend's own kernels (FP8 tensor-core GEMMs through
    torch._scaled_mm): per-tensor fp8, operand dims `FP8_ALIGN`-aligned, kernel dtypes (fp32 / bf16), and on a GPU
    compute capability 8.9+. CPU tensors (the simulator) take the same path. Anything else: the reference math."""
    if fmt != "fp8_tensor" or not fp8_gemm_enabled():
        return False
    if any(d not in ("fp32", "bf16", "fp8_e4m3", "fp8_e5m2") for d in dtypes):
        return False
    if cuda and (tuple(capability) < FP8_CAPABILITY or any(int(d) % FP8_ALIGN for d in dims)):
        return False
    return True


def fp8_amax_slot() -> Spec:
    return Spec("fp8_amax", (1,), "fp32")


def fp8_grad_codes(rows: int, cols: int) -> list[Spec]:
    """The output gradient rounded through its fp8 format (codes) and its just-in-time scale (one per codes slot:
    a slot's codes are reused by the projection's second backward GEMM with their own scale)."""
    return [Spec("fp8_dy_codes", (rows, cols), "uint8"), Spec(f"fp8_dy_scale:{rows}x{cols}", (1,), "fp32")]


def fp8_transposed(tag: str, rows: int, cols: int) -> Spec:
    """A transposed copy of [rows, cols] fp8 codes (cuBLASLt FP8 wants A row-major and B column-major)."""
    return Spec(tag, (cols, rows), "uint8")
