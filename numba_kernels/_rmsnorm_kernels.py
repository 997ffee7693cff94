"""The RMSNorm kernels (launchers and math: rmsnorm.py). Built per dtypes and per row length, for bandwidth.

A row belongs to a group of `tpr` threads (one warp, or a few warps for long rows) and every thread keeps its
elements of the row in registers between the two passes: the forward reads x (and the residual) once and
writes the sum and the output once; the backward reads dy and s once. The row's reduction is a warp shuffle
(plus one shared-memory step across the warps of a group when the row has several). A thread's columns are the
same for every row it handles, so the backward sums its dweight contributions in registers and writes one
partial row per block at the end. bf16 rows with an even length are read and written two values at a time,
as int32 (element 2i in the low half).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch

from ._device import converters, get_cuda, helpers, jit_kernel, log2_block

cuda = None  # numba.cuda, bound by the first kernel build (lazy import)

CACHE = 32  # row elements a thread keeps in registers (per array); rows longer than threads x CACHE re-read
COLS = 8  # columns per colsum block row (the rest of the block: row groups of the partials)


class Layout(NamedTuple):
    """How a block of `threads` covers rows of `hidden` elements (`pair`: two bf16 per int32 access)."""

    hidden: int
    pair: bool
    threads: int
    tpr: int  # threads per row (a multiple of 32)
    rpb: int  # rows per block at a time
    units: int  # accesses per row (hidden, or hidden / 2 for pairs)
    per: int  # accesses per thread and row
    cached: bool  # the row stays in registers between the passes

    @property
    def elems(self) -> int:
        return self.per * (2 if self.pair else 1)


def layout(hidden: int, pair: bool, threads: int) -> Layout:
    """One warp per row while a thread's share fits CACHE, else 2, 4, ... warps (at most the block)."""
    warps = max(1, threads // 32)
    v = 2 if pair else 1
    units = hidden // v
    wpr = 1
    while wpr < warps and v * math.ceil(units / (32 * wpr)) > CACHE:
        wpr *= 2
    tpr = 32 * wpr
    per = math.ceil(units / tpr)
    return Layout(hidden, pair, 32 * warps, tpr, warps // wpr, units, per, v * per <= CACHE)


def _row_total(lay: Layout):
    """Device function: the sum of `acc` over a row's thread group, in every thread of the group."""
    from numba import float32

    warp_sum = helpers().warp_sum
    wpr = lay.tpr // 32

    @cuda.jit(device=True, inline="always")
    def total(acc, sm):
        t = warp_sum(acc)
        if wpr > 1:  # the group's warps add their sums in a fixed order
            tid = cuda.threadIdx.x
            if tid & 31 == 0:
                sm[tid >> 5] = t
            cuda.syncthreads()
            g0 = (tid >> 5) & ~(wpr - 1)
            t = float32(0.0)
            for i in range(wpr):
                t += sm[g0 + i]
            cuda.syncthreads()  # sm is written again by the next row
        return t

    return total


def rope_fits(lay: Layout) -> bool:
    """The rotation can be the forward's epilogue: the row (one head) is in registers and a thread's k-th
    access and its (k + per/2)-th are the two halves' partners (element j and j + D/2), so no exchange."""
    return lay.cached and lay.per % 2 == 0 and lay.per * lay.tpr == lay.units


@functools.cache
def fwd_kernel(x_dt: torch.dtype, w_dt: torch.dtype, o_dt: torch.dtype, has_res: bool, lay: Layout,
               rope: bool = False):
    """`rope`: rows are heads (D = hidden) of `heads`-head tokens, and the normalised head (rounded to the
    output dtype, as the unfused pair stores it) is rotated by the cos/sin table rows of its token's position
    before the one store; needs `rope_fits(lay)`. Without it, pos/cos_t/sin_t/heads are unread."""
    global cuda  # a module global: the simulator swaps `cuda` in kernels' globals at launch
    cuda = get_cuda()
    from numba import float32, int32

    if rope and not rope_fits(lay):
        raise ValueError(f"rmsnorm + rope epilogue needs a cached row split in partner halves, got {lay}")

    h = helpers()
    lx, sx = converters(x_dt)
    lw, _ = converters(w_dt)
    ld_o, so = converters(o_dt)
    lo, hi, pack = h.bf16x2_lo, h.bf16x2_hi, h.bf16x2_pack
    total = _row_total(lay)
    H, PAIR, TPR, RPB, NU, PER, CACHED = lay.hidden, lay.pair, lay.tpr, lay.rpb, lay.units, lay.per, lay.cached
    WARPS, NBUF, SH = lay.threads // 32, lay.elems if lay.cached else 1, log2_block("tpr", lay.tpr)

    HALF_K, HALF_U = lay.per // 2, lay.units // 2  # (rope) a first-half access's partner: k + HALF_K, u + HALF_U

    @jit_kernel
    def kernel(x, res, w, out, sum_out, rstd, eps, pos, cos_t, sin_t, heads):
        buf = cuda.local.array(NBUF, float32)
        sm = cuda.shared.array(WARPS, float32)
        tid = cuda.threadIdx.x
        grp, ut = tid >> SH, tid & (TPR - 1)
        rows = x.shape[0]
        # block-uniform loop (every thread takes part in the row reduction, whose rows may be past the end)
        for base in range(cuda.blockIdx.x * RPB, rows, cuda.gridDim.x * RPB):
            row = base + grp
            valid = row < rows
            acc = float32(0.0)
            if valid:
                for k in range(PER):
                    u = ut + k * TPR
                    if u < NU:
                        if PAIR:
                            p = x[row, u]
                            a, b = lo(p), hi(p)
                            if has_res:  # the residual add rounds to the input dtype, as in HF
                                q = res[row, u]
                                sp = pack(a + lo(q), b + hi(q))
                                sum_out[row, u] = sp
                                a, b = lo(sp), hi(sp)
                            if CACHED:
                                buf[2 * k] = a
                                buf[2 * k + 1] = b
                            acc += a * a
                            acc += b * b
                        else:
                            v = lx(x[row, u])
                            if has_res:
                                sv = sx(v + lx(res[row, u]))
                                sum_out[row, u] = sv
                                v = lx(sv)
                            if CACHED:
                                buf[k] = v
                            acc += v * v
            tot = total(acc, sm)
            if valid:
                r = float32(1.0) / math.sqrt(float32(tot / float32(H)) + float32(eps))
                if ut == 0:
                    rstd[row] = r
                if rope:
                    p = pos[int32(row) // int32(heads)]  # 32-bit division: 64-bit is emulated and slow
                    for k in range(HALF_K):
                        u = ut + k * TPR
                        u2 = u + HALF_U
                        k2 = k + HALF_K
                        if PAIR:  # the norm's output words as the pair stores them, then the rotation's math
                            j = 2 * u
                            n1 = pack(lw(w[j]) * lx(sx(buf[2 * k] * r)), lw(w[j + 1]) * lx(sx(buf[2 * k + 1] * r)))
                            n2 = pack(lw(w[2 * u2]) * lx(sx(buf[2 * k2] * r)),
                                      lw(w[2 * u2 + 1]) * lx(sx(buf[2 * k2 + 1] * r)))
                            x1a, x1b, x2a, x2b = lo(n1), hi(n1), lo(n2), hi(n2)
                            ca, sa = cos_t[p, j], sin_t[p, j]
                            cb, sb = cos_t[p, j + 1], sin_t[p, j + 1]
                            # rope._rotate_fn's math: the second half as an explicit fma (NVVM's contraction)
                            out[row, u] = pack(x1a * ca - x2a * sa, x1b * cb - x2b * sb)
                            out[row, u2] = pack(cuda.fma(x1a, sa, x2a * ca), cuda.fma(x1b, sb, x2b * cb))
                        else:
                            x1 = ld_o(so(lw(w[u]) * lx(sx(buf[k] * r))))
                            x2 = ld_o(so(lw(w[u2]) * lx(sx(buf[k2] * r))))
                            c, sn = cos_t[p, u], sin_t[p, u]
                            out[row, u] = so(x1 * c - x2 * sn)
                            out[row, u2] = so(cuda.fma(x1, sn, x2 * c))
                    continue
                for k in range(PER):
                    u = ut + k * TPR
                    if u < NU:
                        if PAIR:
                            if CACHED:
                                a, b = buf[2 * k], buf[2 * k + 1]
                            else:
                                p = sum_out[row, u] if has_res else x[row, u]
                                a, b = lo(p), hi(p)
                            # HF casts the normalised value back to the input dtype first
                            ya, yb = lx(sx(a * r)), lx(sx(b * r))
                            out[row, u] = pack(lw(w[2 * u]) * ya, lw(w[2 * u + 1]) * yb)
                        else:
                            if CACHED:
                                v = buf[k]
                            else:
                                v = lx(sum_out[row, u]) if has_res else lx(x[row, u])
                            out[row, u] = so(lw(w[u]) * lx(sx(v * r)))

    return kernel


@functools.cache
def bwd_kernel(dy_dt: torch.dtype, s_dt: torch.dtype, w_dt: torch.dtype, has_dres: bool, lay: Layout,
               own_rstd: bool = False, rope: bool = False, with_dw: bool = True):
    """ds per row; each block writes its row `part[blockIdx]` of dweight partials (summed by `colsum_kernel`).

    `own_rstd`: rstd is not read but recomputed from s in the same pass (a second warp sum, free while s is in
    registers; the forward's summation order, so the forward's value), so no caller recomputes it over s.
    `rope` (needs `rope_fits(lay)` and own_rstd): dy is the gradient of the rotation's output; each head's dy is
    first rotated back (rope's backward math, rounded to dy's dtype as the pair stores it) into registers.
    `with_dw` False: no dweight (a frozen weight): no partial sums, nothing written to dw_part."""
    global cuda  # a module global: the simulator swaps `cuda` in kernels' globals at launch
    cuda = get_cuda()
    from numba import float32, int32

    if rope and not (rope_fits(lay) and own_rstd):
        raise ValueError(f"rmsnorm backward with a rope prologue needs a cached row split in partner halves, got {lay}")
    h = helpers()
    ldy, sdy = converters(dy_dt)
    ls, ss = converters(s_dt)
    lw, _ = converters(w_dt)
    lo, hi, pack = h.bf16x2_lo, h.bf16x2_hi, h.bf16x2_pack
    total = _row_total(lay)
    H, PAIR, TPR, RPB, NU, PER, CACHED = lay.hidden, lay.pair, lay.tpr, lay.rpb, lay.units, lay.per, lay.cached
    T, WARPS, E, SH = lay.threads, lay.threads // 32, lay.elems, log2_block("tpr", lay.tpr)
    NBUF = E if CACHED else 1
    OWN = own_rstd
    NSM = RPB * H if RPB > 1 else 1  # the block's row groups' dweight sums (<= 32 KB: RPB > 1 only when cached)
    HALF_K, HALF_U = lay.per // 2, lay.units // 2  # (rope) a first-half access's partner: k + HALF_K, u + HALF_U

    @jit_kernel
    def kernel(dy, s, w, rstd, dres, ds, dw_part, eps, pos, cos_t, sin_t, heads):
        sbuf = cuda.local.array(NBUF, float32)
        gbuf = cuda.local.array(NBUF, float32)
        dwa = cuda.local.array(E, float32)  # this thread's columns' dweight, over all its rows
        sm = cuda.shared.array(WARPS, float32)
        smw = cuda.shared.array(NSM, float32)
        tid = cuda.threadIdx.x
        grp, ut = tid >> SH, tid & (TPR - 1)
        b = cuda.blockIdx.x
        rows = s.shape[0]
        for e in range(E):
            dwa[e] = float32(0.0)
        for base in range(b * RPB, rows, cuda.gridDim.x * RPB):  # block-uniform (see the forward)
            row = base + grp
            valid = row < rows
            acc = float32(0.0)  # sum of g * w * s (times r below)
            sq = float32(0.0)  # sum of s^2 (own_rstd), in the forward's order
            r = float32(0.0)
            if valid:
                if not OWN:
                    r = rstd[row]
                if rope:  # dy <- rope^T(dy) into gbuf: the inverse rotation (sin negated), as rope_bwd stores it
                    pt = pos[int32(row) // int32(heads)]
                    for k in range(HALF_K):
                        u = ut + k * TPR
                        u2 = u + HALF_U
                        k2 = k + HALF_K
                        if PAIR:
                            j = 2 * u
                            q1, q2 = dy[row, u], dy[row, u2]
                            ca, sa_n = cos_t[pt, j], sin_t[pt, j] * float32(-1.0)
                            cb, sb_n = cos_t[pt, j + 1], sin_t[pt, j + 1] * float32(-1.0)
                            # rope._rotate_fn's math with sin negated, as rope_bwd runs it
                            n1 = pack(lo(q1) * ca - lo(q2) * sa_n, hi(q1) * cb - hi(q2) * sb_n)
                            n2 = pack(cuda.fma(lo(q1), sa_n, lo(q2) * ca), cuda.fma(hi(q1), sb_n, hi(q2) * cb))
                            gbuf[2 * k], gbuf[2 * k + 1] = lo(n1), hi(n1)
                            gbuf[2 * k2], gbuf[2 * k2 + 1] = lo(n2), hi(n2)
                        else:
                            x1, x2 = ldy(dy[row, u]), ldy(dy[row, u2])
                            c, sn = cos_t[pt, u], sin_t[pt, u] * float32(-1.0)
                            gbuf[k] = ldy(sdy(x1 * c - x2 * sn))
                            gbuf[k2] = ldy(sdy(cuda.fma(x1, sn, x2 * c)))
                for k in range(PER):
                    u = ut + k * TPR
                    if u < NU:
                        if PAIR:
                            p = s[row, u]
                            sa, sb = lo(p), hi(p)
                            if rope:
                                ga, gb = gbuf[2 * k], gbuf[2 * k + 1]
                            else:
                                q = dy[row, u]
                                ga, gb = lo(q), hi(q)
                            if CACHED:
                                sbuf[2 * k], sbuf[2 * k + 1] = sa, sb
                                gbuf[2 * k], gbuf[2 * k + 1] = ga, gb
                            if OWN:
                                sq += sa * sa
                                sq += sb * sb
                                acc += ga * lw(w[2 * u]) * sa
                                acc += gb * lw(w[2 * u + 1]) * sb
                            else:
                                acc += ga * lw(w[2 * u]) * (sa * r)
                                acc += gb * lw(w[2 * u + 1]) * (sb * r)
                        else:
                            sv = ls(s[row, u])
                            g = gbuf[k] if rope else ldy(dy[row, u])
                            if CACHED:
                                sbuf[k], gbuf[k] = sv, g
                            if OWN:
                                sq += sv * sv
                                acc += g * lw(w[u]) * sv
                            else:
                                acc += g * lw(w[u]) * (sv * r)
            if OWN:  # every thread of the block takes part in both sums (block-uniform)
                tsq = total(sq, sm)
                r = float32(1.0) / math.sqrt(float32(tsq / float32(H)) + float32(eps))
                dot = r * total(acc, sm) / float32(H)
            else:
                dot = total(acc, sm) / float32(H)
            if valid:
                for k in range(PER):
                    u = ut + k * TPR
                    if u < NU:
                        if PAIR:
                            if CACHED:
                                sa, sb, ga, gb = sbuf[2 * k], sbuf[2 * k + 1], gbuf[2 * k], gbuf[2 * k + 1]
                            else:
                                p, q = s[row, u], dy[row, u]
                                sa, sb, ga, gb = lo(p), hi(p), lo(q), hi(q)
                            xa, xb = sa * r, sb * r
                            va = r * (ga * lw(w[2 * u]) - xa * dot)
                            vb = r * (gb * lw(w[2 * u + 1]) - xb * dot)
                            if has_dres:
                                q = dres[row, u]
                                va += lo(q)
                                vb += hi(q)
                            ds[row, u] = pack(va, vb)
                            if with_dw:
                                dwa[2 * k] += ga * xa
                                dwa[2 * k + 1] += gb * xb
                        else:
                            if CACHED:
                                sv, g = sbuf[k], gbuf[k]
                            else:
                                sv, g = ls(s[row, u]), ldy(dy[row, u])
                            xhat = sv * r
                            v = r * (g * lw(w[u]) - xhat * dot)
                            if has_dres:
                                v += ls(dres[row, u])
                            ds[row, u] = ss(v)
                            if with_dw:
                                dwa[k] += g * xhat
        if not with_dw:
            return
        # one partial row per block: the row groups' sums added in a fixed order (deterministic)
        for k in range(PER):
            u = ut + k * TPR
            if u < NU:
                if PAIR:
                    if RPB > 1:
                        smw[grp * H + 2 * u] = dwa[2 * k]
                        smw[grp * H + 2 * u + 1] = dwa[2 * k + 1]
                    else:
                        dw_part[b, 2 * u] = dwa[2 * k]
                        dw_part[b, 2 * u + 1] = dwa[2 * k + 1]
                else:
                    if RPB > 1:
                        smw[grp * H + u] = dwa[k]
                    else:
                        dw_part[b, u] = dwa[k]
        if RPB > 1:
            cuda.syncthreads()
            for c in range(tid, H, T):
                t = smw[c]
                for g in range(1, RPB):
                    t += smw[g * H + c]
                dw_part[b, c] = t

    return kernel


@functools.cache
def colsum_kernel(o_dt: torch.dtype, T: int):
    """out[c] = sum_b part[b, c]: a block takes COLS columns with T / COLS row groups (each a strided sum over
    the partials), then adds the groups in a fixed order through shared memory: deterministic, and enough
    threads for a few hundred partial rows."""
    global cuda  # a module global: the simulator swaps `cuda` in kernels' globals at launch
    cuda = get_cuda()
    from numba import float32

    _, so = converters(o_dt)
    RG, SH = T // COLS, log2_block("COLS", COLS)

    @jit_kernel
    def kernel(part, out):
        sm = cuda.shared.array(T, float32)
        tid = cuda.threadIdx.x
        cl, rg = tid & (COLS - 1), tid >> SH
        nb, n = part.shape
        for c0 in range(cuda.blockIdx.x * COLS, n, cuda.gridDim.x * COLS):  # block-uniform
            c = c0 + cl
            acc = float32(0.0)
            if c < n:
                for b in range(rg, nb, RG):
                    acc += part[b, c]
            sm[tid] = acc
            cuda.syncthreads()
            if rg == 0 and c < n:
                t = sm[cl]
                for g in range(1, RG):
                    t += sm[g * COLS + cl]
                out[c] = so(t)
            cuda.syncthreads()

    return kernel
