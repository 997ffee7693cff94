"""Numba-CUDA kernels of the fused LM-head cross-entropy (see cross_entropy.py for the math and launchers).

Per logits tile [rows, tile]: `_stats_kernel` (online logsumexp merged into running max / sum, label
logit), `_finalize_kernel` (lse, per-row loss), `_grad_kernel` (in-place dlogits), and `_fused_kernel`
(all of it for whole-vocabulary rows in one launch).

Bandwidth: a block owns a row; its threads read the row as words of `width` logits (4 bf16 in an int64, 2 in an
int32, or 1 element when the tile's width, strides or alignment do not allow wider: `_vec.word_view`), UNROLL
words per thread and iteration, all loaded before any is used (several loads in flight per thread). The online
logsumexp takes the max over an iteration's words first and rescales the running sum at most once, so each
element costs one exp. Thread t owns words t, t + T, t + 2T, ... in the stats and the gradient pass alike, and
reductions run in a fixed order: results are deterministic.
"""

from __future__ import annotations

import functools
import math
from types import SimpleNamespace

import torch

from ._device import converters, get_cuda, helpers, jit_kernel, log2_block, threads
from ._vec import vec_helpers

cuda = None  # numba.cuda, bound by the first kernel build (lazy import)

# A running max starts at -FLT_MAX, not -inf: exp(-inf - -inf) would be NaN where a word is all -inf, while
# exp(v - -FLT_MAX) and exp(-FLT_MAX - v) stay finite or 0 for every finite or -inf v.
NEG_MAX = -3.4028234663852886e38


def _unroll(l_dt: torch.dtype, width: int) -> int:
    """Words per thread and iteration: about 16 bytes in flight per thread (2 int64, 4 of anything narrower)."""
    word_bytes = 4 if l_dt == torch.float32 else 2 * width
    return max(2, min(4, 16 // word_bytes))


@functools.cache
def _word_ops(l_dt: torch.dtype, width: int) -> SimpleNamespace:
    """Device functions on one word of `width` logits (float32 math; element k of a word is column W * u + k):
    wmax(w) -> max, wexp(w, m) -> sum of exp(v - m), welem(w, j) -> element j,
    wgrad(w, m, scale, j) -> the word of scale * (exp(v - m) - [k == j]) in storage format."""
    global cuda
    cuda = get_cuda()
    from numba import float32

    jit_dev = cuda.jit(device=True, inline="always")
    one = float32(1.0)
    if width == 1:
        ll, sl = converters(l_dt)

        @jit_dev
        def wmax(w):
            return ll(w)

        @jit_dev
        def wexp(w, m):
            return float32(math.exp(ll(w) - m))

        @jit_dev
        def welem(w, j):
            return ll(w)

        @jit_dev
        def wgrad(w, m, scale, j):
            p = float32(math.exp(ll(w) - m))
            if j == 0:
                p -= one
            return sl(p * scale)

    elif width == 2:
        vh = vec_helpers()
        unpack, pack = vh.unpack2, vh.pack2

        @jit_dev
        def wmax(w):
            a, b = unpack(w)
            return max(a, b)

        @jit_dev
        def wexp(w, m):
            a, b = unpack(w)
            return float32(math.exp(a - m)) + float32(math.exp(b - m))

        @jit_dev
        def welem(w, j):
            a, b = unpack(w)
            return a if j == 0 else b

        @jit_dev
        def wgrad(w, m, scale, j):
            a, b = unpack(w)
            pa, pb = float32(math.exp(a - m)), float32(math.exp(b - m))
            if j >= 0 and j < 2:  # the label's word (one per row): the common path costs one test
                if j == 0:
                    pa -= one
                else:
                    pb -= one
            return pack(pa * scale, pb * scale)

    elif width == 4:
        vh = vec_helpers()
        unpack, pack = vh.unpack4, vh.pack4

        @jit_dev
        def wmax(w):
            a, b, c, d = unpack(w)
            return max(max(a, b), max(c, d))

        @jit_dev
        def wexp(w, m):
            a, b, c, d = unpack(w)
            return ((float32(math.exp(a - m)) + float32(math.exp(b - m)))
                    + (float32(math.exp(c - m)) + float32(math.exp(d - m))))

        @jit_dev
        def welem(w, j):
            a, b, c, d = unpack(w)
            if j < 2:
                return a if j == 0 else b
            return c if j == 2 else d

        @jit_dev
        def wgrad(w, m, scale, j):
            a, b, c, d = unpack(w)
            pa, pb = float32(math.exp(a - m)), float32(math.exp(b - m))
            pc, pd = float32(math.exp(c - m)), float32(math.exp(d - m))
            if j >= 0 and j < 4:
                if j == 0:
                    pa -= one
                elif j == 1:
                    pb -= one
                elif j == 2:
                    pc -= one
                else:
                    pd -= one
            return pack(pa * scale, pb * scale, pc * scale, pd * scale)

    else:
        raise ValueError(f"word width must be 1, 2 or 4, got {width}")
    return SimpleNamespace(wmax=wmax, wexp=wexp, welem=welem, wgrad=wgrad)


def _word_type(l_dt: torch.dtype, width: int):
    from numba import float32, int16, int32, int64

    if l_dt == torch.float32:
        if width != 1:
            raise ValueError("float32 logits are read one element at a time (width 1)")
        return float32
    return {1: int16, 2: int32, 4: int64}[width]


@functools.cache
def _row_ops(l_dt: torch.dtype, width: int) -> SimpleNamespace:
    """Device functions over one row of words, for one thread of its block (T threads, UNROLL words at a time):
    row_stats -> the thread's (max, sum of exp(v - max)); row_grad writes the row's dlogits in place;
    label_logit -> column c's logit as float32."""
    global cuda
    cuda = get_cuda()
    from numba import float32

    ops = _word_ops(l_dt, width)
    wmax, wexp, welem, wgrad = ops.wmax, ops.wexp, ops.welem, ops.wgrad
    T, U, W = threads(), _unroll(l_dt, width), width
    TU, LW = T * U, log2_block("width", width)
    WT = _word_type(l_dt, width)
    jit_dev = cuda.jit(device=True, inline="always")

    @jit_dev
    def row_stats(logits, row, tid):
        nw = logits.shape[1]
        full = nw - (nw & (TU - 1))  # words covered by whole iterations (TU is a power of two)
        wd = cuda.local.array(U, WT)  # registers: U is a constant and every index below is unrolled
        m = float32(NEG_MAX)
        s = float32(0.0)
        for u in range(tid, full, TU):
            for k in range(U):  # every load issued before any is used
                wd[k] = logits[row, u + k * T]
            mx = m
            for k in range(U):
                mx = max(mx, wmax(wd[k]))
            if mx > m:  # at most one rescale per iteration (rare once the row's max is found)
                s = s * float32(math.exp(m - mx))
                m = mx
            t = float32(0.0)
            for k in range(U):
                t += wexp(wd[k], m)
            s += t
        for u in range(full + tid, nw, T):
            w = logits[row, u]
            mx = wmax(w)
            if mx > m:
                s = s * float32(math.exp(m - mx))
                m = mx
            s += wexp(w, m)
        return m, s

    @jit_dev
    def row_grad(logits, row, tid, m, scale, tc, ignored):
        """logits[row] <- scale * (exp(v - m) - onehot(tc)); zeros when ignored (nothing read)."""
        nw = logits.shape[1]
        if ignored:
            for u in range(tid, nw, T):
                logits[row, u] = 0
            return
        full = nw - (nw & (TU - 1))
        wd = cuda.local.array(U, WT)
        for u in range(tid, full, TU):
            for k in range(U):
                wd[k] = logits[row, u + k * T]
            for k in range(U):
                uu = u + k * T
                logits[row, uu] = wgrad(wd[k], m, scale, tc - (uu << LW))
        for u in range(full + tid, nw, T):
            logits[row, u] = wgrad(logits[row, u], m, scale, tc - (u << LW))

    @jit_dev
    def label_logit(logits, row, c):
        return welem(logits[row, c >> LW], c & (W - 1))

    return SimpleNamespace(row_stats=row_stats, row_grad=row_grad, label_logit=label_logit)


@functools.cache
def _stats_kernel(l_dt: torch.dtype, *, width: int):
    """Online logsumexp over one vocab tile (words of `width` logits), merged into the running (max, sum) per
    row; picks the label logit when the label is in the tile."""
    global cuda  # a module global: the simulator swaps `cuda` in kernels' globals at launch
    cuda = get_cuda()
    from numba import float32

    h = helpers()
    block_sum, block_max = h.block_sum, h.block_max
    ro = _row_ops(l_dt, width)
    row_stats, label_logit = ro.row_stats, ro.label_logit
    T, W = threads(), width

    @jit_kernel
    def kernel(logits, labels, v0, first, m_run, s_run, tgt):
        sm = cuda.shared.array(T, float32)
        tid = cuda.threadIdx.x
        rows = logits.shape[0]
        vt = logits.shape[1] * W
        for row in range(cuda.blockIdx.x, rows, cuda.gridDim.x):
            mt, st = row_stats(logits, row, tid)
            mb = block_max(sm, mt)
            sb = block_sum(sm, st * float32(math.exp(mt - mb)))  # st = 0 where a thread saw nothing
            if tid == 0:
                tc = labels[row] - v0
                if tc >= 0 and tc < vt:  # ignored labels are negative: never in a tile
                    tgt[row] = label_logit(logits, row, tc)
                if first:
                    m_run[row] = mb
                    s_run[row] = sb
                else:
                    mo = m_run[row]
                    so = s_run[row]
                    mn = max(mo, mb)
                    m_run[row] = mn
                    s_run[row] = so * float32(math.exp(mo - mn)) + sb * float32(math.exp(mb - mn))

    return kernel


@functools.cache
def _finalize_kernel():
    global cuda
    cuda = get_cuda()
    from numba import float32

    @jit_kernel
    def kernel(m_run, s_run, tgt, labels, ignore_index, lse, loss_rows):
        for r in range(cuda.grid(1), lse.shape[0], cuda.gridsize(1)):
            v = m_run[r] + float32(math.log(s_run[r]))
            lse[r] = v
            if labels[r] == ignore_index:
                loss_rows[r] = float32(0.0)
            else:
                loss_rows[r] = v - tgt[r]

    return kernel


@functools.cache
def _grad_kernel(l_dt: torch.dtype, *, width: int, device_scale: bool = False):
    """logits <- grad_scale * (exp(logit - lse) - onehot(label)), in place (words of `width` logits); zero rows
    for ignored labels.

    `device_scale`: grad_scale is an fp32 device array [1] (e.g. 1 / num_items computed on the device: no host
    read, one rounding to the logits dtype instead of a second scaling pass)."""
    global cuda
    cuda = get_cuda()
    from numba import float32

    row_grad = _row_ops(l_dt, width).row_grad

    @cuda.jit(device=True, inline="always")
    def rows_grad(logits, labels, lse, v0, scale, ignore_index):
        tid = cuda.threadIdx.x
        for r in range(cuda.blockIdx.x, logits.shape[0], cuda.gridDim.x):  # a block per row: no index division
            lab = labels[r]
            row_grad(logits, r, tid, lse[r], scale, lab - v0, lab == ignore_index)

    if device_scale:

        @jit_kernel
        def kernel(logits, labels, lse, v0, grad_scale, ignore_index):
            rows_grad(logits, labels, lse, v0, float32(grad_scale[0]), ignore_index)

    else:

        @jit_kernel
        def kernel(logits, labels, lse, v0, grad_scale, ignore_index):
            rows_grad(logits, labels, lse, v0, float32(grad_scale), ignore_index)

    return kernel


@functools.cache
def _fused_kernel(l_dt: torch.dtype, *, width: int, device_scale: bool = False):
    """Whole-vocabulary rows: logsumexp, loss and the in-place logits gradient in one launch (2 passes).
    `device_scale`: grad_scale is an fp32 device array [1], as in `_grad_kernel`."""
    global cuda
    cuda = get_cuda()
    from numba import float32

    h = helpers()
    block_sum, block_max = h.block_sum, h.block_max
    ro = _row_ops(l_dt, width)
    row_stats, row_grad, label_logit = ro.row_stats, ro.row_grad, ro.label_logit
    T = threads()

    @cuda.jit(device=True, inline="always")
    def rows_fused(logits, labels, scale, ignore_index, lse, loss_rows):
        sm = cuda.shared.array(T, float32)
        tid = cuda.threadIdx.x
        for row in range(cuda.blockIdx.x, logits.shape[0], cuda.gridDim.x):
            lab = labels[row]
            ignored = lab == ignore_index
            mt, st = row_stats(logits, row, tid)
            mb = block_max(sm, mt)
            m = mb + float32(math.log(block_sum(sm, st * float32(math.exp(mt - mb)))))
            if tid == 0:
                lse[row] = m
                if ignored:
                    loss_rows[row] = float32(0.0)
                else:
                    loss_rows[row] = m - label_logit(logits, row, lab)
            cuda.syncthreads()  # the label logit is read above before its word is overwritten below
            row_grad(logits, row, tid, m, scale, lab, ignored)

    if device_scale:

        @jit_kernel
        def kernel(logits, labels, grad_scale, ignore_index, lse, loss_rows):
            rows_fused(logits, labels, float32(grad_scale[0]), ignore_index, lse, loss_rows)

    else:

        @jit_kernel
        def kernel(logits, labels, grad_scale, ignore_index, lse, loss_rows):
            rows_fused(logits, labels, float32(grad_scale), ignore_index, lse, loss_rows)

    return kernel
