"""LoRA merge: out = base + scale * (h @ B^T), the up-projection and residual add of a LoRA adapter in one pass.

Math (the definition: the unfused `linear(h, B, scale)` then `add(base, .)` of the reference backend): the product
is accumulated in fp32 over k = 0..r-1 in order, times `scale`, rounded to the adapters' dtype (that of h and B,
promoted), then to base's dtype, then added to base in base's dtype (fp32 arithmetic, one rounding into out).

Why a kernel: with fp32 adapters the unfused pair writes a [rows, out] fp32 product, reads it back to cast it and
again to add it (~16 bytes per output element besides base and out). Here every output element costs its base
read and its out write; h ([rows, r]) and B ([out, r]) are tiny.

Layout: a block owns a tile of T output columns (one per thread, so base/out accesses of a warp are coalesced) and
walks row tiles of TR rows in a grid-stride loop. Each thread keeps its column's B row in registers (r is a
compile-time constant of the kernel variant, so the loops over k unroll), and the block stages the tile's h rows
in shared memory (read as broadcasts). Ranks above R_MAX take a variant that reads h and B from global memory.
"""

from __future__ import annotations

import functools

import torch

from ._device import check_contiguous, converters, get_cuda, grid_for, jit_kernel, launch, threads

cuda = None  # numba.cuda, bound by the first kernel build (lazy import)

R_MAX = 64  # largest rank kept in registers / shared memory
ROW_TILE = 8  # rows of h staged in shared memory per step


def lora_merge_ref(base: torch.Tensor, h: torch.Tensor, b: torch.Tensor, out: torch.Tensor, scale: float) -> None:
    """out = base + round(scale * h @ b^T): the reference backend's `linear` then `add`, written into out."""
    dt = torch.promote_types(h.dtype, b.dtype)
    y = h.to(dt) @ b.to(dt).t()
    if scale != 1.0:
        y = y * scale
    out.copy_(base + y.to(base.dtype))


@functools.cache
def _kernel(base_dt: torch.dtype, h_dt: torch.dtype, b_dt: torch.dtype, out_dt: torch.dtype, rank: int,
            round_bf16: bool):
    """One variant per dtype combination and rank (rank 0: the global-memory variant for rank > R_MAX)."""
    global cuda  # a module global: the simulator swaps `cuda` in kernels' globals at launch
    cuda = get_cuda()
    from numba import float32, int32

    lbase, _ = converters(base_dt)
    lh, _ = converters(h_dt)
    lb, _ = converters(b_dt)
    _, so = converters(out_dt)
    to_f32, to_bf16 = converters(torch.bfloat16)
    T = threads()
    TR = ROW_TILE
    R = rank
    RS = max(R, 1)  # local/shared array extents must be positive constants (not expressions)
    HS = TR * RS
    ROUND = round_bf16

    @jit_kernel
    def kernel(base, h, b, out, scale):
        rows, cols = base.shape
        r_dyn = h.shape[1]
        tid = cuda.threadIdx.x
        n_ct = (cols + T - 1) // T
        ct = cuda.blockIdx.x % n_ct
        rg = cuda.blockIdx.x // n_ct
        n_rg = cuda.gridDim.x // n_ct
        n_rt = (rows + TR - 1) // TR
        c = ct * T + tid
        live = c < cols
        s = float32(scale)
        hs = cuda.shared.array(HS, float32)
        bcol = cuda.local.array(RS, float32)
        if R > 0 and live:
            for k in range(R):
                bcol[k] = lb(b[c, k])
        for rt in range(rg, n_rt, n_rg):
            r0 = rt * TR
            if R > 0:
                cuda.syncthreads()  # the previous tile's h is no longer read
                for i in range(tid, TR * R, T):
                    j = int32(i // R)
                    rr = r0 + j
                    hs[i] = lh(h[rr, i - j * R]) if rr < rows else float32(0.0)
                cuda.syncthreads()
            if live:
                for j in range(TR):
                    rr = r0 + j
                    if rr < rows:
                        acc = float32(0.0)
                        if R > 0:
                            for k in range(R):
                                acc += hs[j * R + k] * bcol[k]
                        else:
                            for k in range(r_dyn):
                                acc += lh(h[rr, k]) * lb(b[c, k])
                        v = acc * s
                        if ROUND:  # into the adapters' dtype, then base's: bf16 when either is bf16
                            v = to_f32(to_bf16(v))
                        out[rr, c] = so(lbase(base[rr, c]) + v)

    return kernel


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def lora_merge(base: torch.Tensor, h: torch.Tensor, b: torch.Tensor, out: torch.Tensor, scale: float) -> None:
    """out = base + scale * h @ b^T with the reference's roundings; base/out [..., cols], h [..., r], b [cols, r].

    float32 or bfloat16 each; out may be base (in place);
    base's and h's rows may be strided (column views of stacked projections)."""
    for name, t in (("b", b), ("out", out)):
        check_contiguous(name, t)
    for name, t in (("base", base), ("h", h)):  # column slices of wider matrices: rows strided, 2D indexing
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have unit stride along its last dim (strides {t.stride()})")
    b2, h2, o2 = base.view(-1, base.shape[-1]), h.view(-1, h.shape[-1]), _rows(out)
    rows, cols = b2.shape
    r = h2.shape[1]
    if b.shape != (cols, r) or h2.shape[0] != rows or o2.shape != b2.shape:
        raise ValueError(f"lora_merge: shapes base {tuple(base.shape)}, h {tuple(h.shape)}, b {tuple(b.shape)}, "
                         f"out {tuple(out.shape)} do not fit")
    lora_dt = torch.promote_types(h.dtype, b.dtype)
    round_bf16 = torch.bfloat16 in (lora_dt, base.dtype)
    kernel = _kernel(base.dtype, h.dtype, b.dtype, out.dtype, r if r <= R_MAX else 0, round_bf16)
    t = threads()
    n_ct = -(-cols // t)
    n_rt = -(-rows // ROW_TILE)
    groups = min(n_rt, max(1, grid_for(n_ct * n_rt, 1) // n_ct))
    launch(kernel, n_ct * groups, t, b2, h2, b, o2, float(scale))


# -- the folded up-projection's weight columns (pass fold_lora_up_projection) -------------------------------------
# A folded projection multiplies [x | h_1 .. h_n] by [W | tail] where the tail [out, n*r] holds scale * B in its
# slot's r columns and zeros elsewhere: y = x @ W^T + scale * h_slot @ B^T in one GEMM. The tail is rewritten from
# B before the projection runs (B changes every optimizer step).


def lora_fold_tail_ref(b: torch.Tensor, tail: torch.Tensor, scale: float, slot: int) -> None:
    """tail[:, slot*r:(slot+1)*r] = round(scale * b) (fp32 product, one rounding into tail's dtype), zeros elsewhere."""
    r = b.shape[1]
    tail.zero_()
    tail[:, slot * r : (slot + 1) * r].copy_(b.float() * float(scale))


@functools.cache
def _fold_kernel(b_dt: torch.dtype, t_dt: torch.dtype):
    global cuda
    cuda = get_cuda()
    from numba import float32

    lb, _ = converters(b_dt)
    _, so = converters(t_dt)

    @jit_kernel
    def kernel(b, tail, scale, slot):
        rows, width = tail.shape
        r = b.shape[1]
        lo = slot * r
        s = float32(scale)
        zero = so(float32(0.0))
        start = cuda.grid(1)
        step = cuda.gridsize(1)
        for i in range(start, rows * width, step):  # consecutive threads take consecutive columns of a row
            o = i // width
            j = i - o * width
            tail[o, j] = so(lb(b[o, j - lo]) * s) if lo <= j < lo + r else zero

    return kernel


def lora_fold_tail(b: torch.Tensor, tail: torch.Tensor, scale: float, slot: int) -> None:
    """The tail columns of a folded projection's weight from its adapter's B ([out, r], contiguous): tail
    [out, n * r] (rows may be strided: a column view of the [W | tail] weight), one launch."""
    check_contiguous("b", b)
    if tail.dim() != 2 or tail.stride(-1) != 1:
        raise ValueError(f"tail must be 2D with unit column stride (shape {tuple(tail.shape)}, strides {tail.stride()})")
    r = b.shape[1]
    if b.shape[0] != tail.shape[0] or not 0 <= slot or (slot + 1) * r > tail.shape[1]:
        raise ValueError(f"lora_fold_tail: b {tuple(b.shape)} does not fit slot {slot} of tail {tuple(tail.shape)}")
    t = threads()
    launch(_fold_kernel(b.dtype, tail.dtype), grid_for(tail.numel(), t), t, b, tail, float(scale), int(slot))
