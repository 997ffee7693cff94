"""Numba-CUDA kernels of the fused LM-head cross-entropy (see cross_entropy.py for the math and drivers).

Per logits tile [rows, tile]: `_stats_kernel` (online logsumexp merged into running max / sum, label
logit), `_finalize_kernel` (lse, per-row loss), `_grad_kernel` (in-place dlogits), and `_fused_kernel`
(all of it for whole-vocabulary rows in one launch).
"""

from __future__ import annotations

import functools
import math

import torch

from ._device import converters, get_cuda, helpers, jit_kernel, threads

cuda = None  # numba.cuda, bound by the first kernel build (lazy import)


@functools.cache
def _stats_kernel(l_dt: torch.dtype):
    """Online logsumexp over one vocab tile, merged into the running (max, sum) per row; picks the label logit."""
    global cuda  # a module global: the simulator swaps `cuda` in kernels' globals at launch
    cuda = get_cuda()
    from numba import float32

    h = helpers()
    ll, _ = converters(l_dt)
    block_sum, block_max = h.block_sum, h.block_max
    T = threads()

    @jit_kernel
    def kernel(logits, labels, v0, first, m_run, s_run, tgt):
        sm = cuda.shared.array(T, float32)
        tid = cuda.threadIdx.x
        rows, vt = logits.shape
        neg_inf = float32(-math.inf)
        for row in range(cuda.blockIdx.x, rows, cuda.gridDim.x):
            lab = labels[row] - v0
            mt = neg_inf
            st = float32(0.0)
            for c in range(tid, vt, T):
                v = ll(logits[row, c])
                if c == lab:
                    tgt[row] = v
                if v > mt:
                    st = st * float32(math.exp(mt - v)) + float32(1.0)
                    mt = v
                else:
                    st += float32(math.exp(v - mt))
            mb = block_max(sm, mt)
            scaled = float32(0.0)
            if st > float32(0.0):
                scaled = st * float32(math.exp(mt - mb))
            sb = block_sum(sm, scaled)
            if tid == 0:
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
def _grad_kernel(l_dt: torch.dtype, device_scale: bool = False):
    """logits <- grad_scale * (exp(logit - lse) - onehot(label)), in place; zero rows for ignored labels.

    `device_scale`: grad_scale is an fp32 device array [1] (e.g. 1 / num_items computed on the device: no host
    read, one rounding to the logits dtype instead of a second scaling pass)."""
    global cuda
    cuda = get_cuda()
    from numba import float32

    ll, sl = converters(l_dt)

    T = threads()

    @cuda.jit(device=True, inline="always")
    def rows_grad(logits, labels, lse, v0, scale, ignore_index):
        rows, vt = logits.shape
        for r in range(cuda.blockIdx.x, rows, cuda.gridDim.x):  # a block per row: no index division
            lab = labels[r]
            ignored = lab == ignore_index
            tc = lab - v0
            m = lse[r]
            for c in range(cuda.threadIdx.x, vt, T):
                if ignored:
                    logits[r, c] = sl(float32(0.0))
                else:
                    p = float32(math.exp(ll(logits[r, c]) - m))
                    if c == tc:
                        p -= float32(1.0)
                    logits[r, c] = sl(p * scale)

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
def _fused_kernel(l_dt: torch.dtype):
    """Whole-vocabulary rows: logsumexp, loss and the in-place logits gradient in one launch (2 passes)."""
    global cuda
    cuda = get_cuda()
    from numba import float32

    h = helpers()
    ll, sl = converters(l_dt)
    block_sum, block_max = h.block_sum, h.block_max
    T = threads()

    @jit_kernel
    def kernel(logits, labels, grad_scale, ignore_index, lse, loss_rows):
        sm = cuda.shared.array(T, float32)
        tid = cuda.threadIdx.x
        rows, vocab = logits.shape
        scale = float32(grad_scale)
        for row in range(cuda.blockIdx.x, rows, cuda.gridDim.x):
            lab = labels[row]
            ignored = lab == ignore_index
            mt = float32(-math.inf)
            st = float32(0.0)
            for c in range(tid, vocab, T):
                v = ll(logits[row, c])
                if v > mt:
                    st = st * float32(math.exp(mt - v)) + float32(1.0)
                    mt = v
                else:
                    st += float32(math.exp(v - mt))
            mb = block_max(sm, mt)
            scaled = float32(0.0)
            if st > float32(0.0):
                scaled = st * float32(math.exp(mt - mb))
            m = mb + float32(math.log(block_sum(sm, scaled)))
            if tid == 0:
                lse[row] = m
                if ignored:
                    loss_rows[row] = float32(0.0)
                else:
                    loss_rows[row] = m - ll(logits[row, lab])
            cuda.syncthreads()  # the label logit is read above before it is overwritten below
            for c in range(tid, vocab, T):
                if ignored:
                    logits[row, c] = sl(float32(0.0))
                else:
                    p = float32(math.exp(ll(logits[row, c]) - m))
                    if c == lab:
                        p -= float32(1.0)
                    logits[row, c] = sl(p * scale)

    return kernel
