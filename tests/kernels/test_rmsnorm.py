"""RMSNorm kernels vs reference, and the reference vs transformers' Qwen3RMSNorm / LlamaRMSNorm."""

from __future__ import annotations

import pytest
import torch

from surogate.numba_kernels.rmsnorm import (
    rmsnorm_backward,
    rmsnorm_backward_ref,
    rmsnorm_forward,
    rmsnorm_forward_ref,
)

from .helpers import DTYPES, close

cuda = None  # numba.cuda, bound by the test that builds its own kernel


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,hidden", [(1, 8), (7, 37), (5, 64)])
def test_forward_matches_reference(dtype, rows, hidden):
    x = torch.randn(rows, hidden).to(dtype)
    w = (torch.rand(hidden) + 0.5).to(dtype)
    out, rstd = torch.empty_like(x), torch.empty(rows)
    rmsnorm_forward(x, w, out, rstd, 1e-6)
    ref_out, ref_rstd, _ = rmsnorm_forward_ref(x, w, 1e-6)
    torch.testing.assert_close(rstd, ref_rstd, rtol=1e-6, atol=1e-6)
    close(out, ref_out, dtype)
    if dtype == torch.bfloat16:
        # one rounding per value from identical fp32 math: at most one bf16 ulp apart, mostly identical
        assert (out != ref_out).float().mean() < 0.02


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_residual_forward(dtype):
    rows, hidden = 6, 45
    x, res = torch.randn(rows, hidden).to(dtype), torch.randn(rows, hidden).to(dtype)
    w = torch.randn(hidden).to(dtype)
    out, rstd, summed = torch.empty_like(x), torch.empty(rows), torch.empty_like(x)
    rmsnorm_forward(x, w, out, rstd, 1e-5, residual=res, sum_out=summed)
    ref_out, ref_rstd, ref_sum = rmsnorm_forward_ref(x, w, 1e-5, residual=res)
    assert torch.equal(summed, ref_sum)  # the residual add is one rounding of an exact sum
    torch.testing.assert_close(rstd, ref_rstd, rtol=1e-6, atol=1e-6)
    close(out, ref_out, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_dres", [False, True])
def test_backward_matches_reference(dtype, with_dres):
    _bwd_check(9, 33, dtype, with_dres)  # rows > simulator grid cap: blocks loop over rows and sum partials


def test_backward_workspace_is_used_and_checked():
    s, dy = torch.randn(3, 16), torch.randn(3, 16)
    w = torch.randn(16)
    _, rstd, _ = rmsnorm_forward_ref(s, w, 1e-6)
    ds, dw = torch.empty_like(s), torch.empty_like(w)
    ws = torch.full((2, 16), float("nan"))  # stale contents must not leak into dweight
    rmsnorm_backward(dy, s, w, rstd, ds, dw, workspace=ws)
    close(dw, rmsnorm_backward_ref(dy, s, w, rstd)[1])
    with pytest.raises(ValueError, match="workspace"):
        rmsnorm_backward(dy, s, w, rstd, ds, dw, workspace=torch.zeros(2, 15))


@pytest.mark.parametrize("cls_name", ["Qwen3RMSNorm", "LlamaRMSNorm"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_matches_transformers(cls_name, dtype):
    import importlib

    family = cls_name.removesuffix("RMSNorm").lower()
    cls = getattr(importlib.import_module(f"transformers.models.{family}.modeling_{family}"), cls_name)
    hidden = 48
    mod = cls(hidden, eps=1e-6).to(dtype)
    with torch.no_grad():
        mod.weight.copy_(torch.randn(hidden))
    x = torch.randn(2, 5, hidden, dtype=dtype, requires_grad=True)
    y = mod(x)
    out, rstd, _ = rmsnorm_forward_ref(x.detach(), mod.weight.detach(), 1e-6)
    assert torch.equal(out, y.detach())  # same ops in the same order: bit-identical
    dy = torch.randn_like(y)
    y.backward(dy)
    ds, dw = rmsnorm_backward_ref(dy, x.detach(), mod.weight.detach(), rstd)
    close(ds, x.grad, dtype)
    # HF's weight gradient multiplies dy by the bf16-rounded normalised value: a bf16-level difference
    close(dw, mod.weight.grad, dtype)


# ---------------------------------------------------------------- shapes and layouts of the warp-per-row kernels


def _fwd_check(rows, hidden, dtype, with_res):
    x = torch.randn(rows, hidden).to(dtype)
    w = (torch.rand(hidden) + 0.5).to(dtype)
    res = torch.randn(rows, hidden).to(dtype) if with_res else None
    out, rstd = torch.empty_like(x), torch.empty(rows)
    summed = torch.empty_like(x) if with_res else None
    rmsnorm_forward(x, w, out, rstd, 1e-6, residual=res, sum_out=summed)
    ref_out, ref_rstd, ref_sum = rmsnorm_forward_ref(x, w, 1e-6, residual=res)
    if with_res:
        assert torch.equal(summed, ref_sum)
    torch.testing.assert_close(rstd, ref_rstd, rtol=1e-6, atol=1e-6)
    close(out, ref_out, dtype)


def _bwd_check(rows, hidden, dtype, with_dres, own_rstd=False):
    """`own_rstd`: the kernel gets no rstd and recomputes it from s (what the cuda backend runs)."""
    s, dy = torch.randn(rows, hidden).to(dtype), torch.randn(rows, hidden).to(dtype)
    s[0] *= 30.0  # rows of very different scales: a wrong or shared rstd shows
    w = torch.randn(hidden).to(dtype)
    dres = torch.randn(rows, hidden).to(dtype) if with_dres else None
    _, rstd, _ = rmsnorm_forward_ref(s, w, 1e-6)
    ds, dw = torch.empty_like(s), torch.empty_like(w)
    rmsnorm_backward(dy, s, w, None if own_rstd else rstd, ds, dw, dresidual=dres, eps=1e-6)
    ref_ds, ref_dw = rmsnorm_backward_ref(dy, s, w, rstd, dresidual=dres)
    close(ds, ref_ds, dtype)
    close(dw, ref_dw, dtype)


# hidden: odd, not a multiple of 32 / 64, the q/k-norm 128; rows: 1, not a multiple of the rows per block
SHAPES = [(1, 33), (9, 100), (5, 128), (11, 64)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,hidden", SHAPES)
@pytest.mark.parametrize("with_res", [False, True])
def test_forward_shapes(dtype, rows, hidden, with_res):
    _fwd_check(rows, hidden, dtype, with_res)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,hidden", SHAPES)
@pytest.mark.parametrize("with_dres", [False, True])
def test_backward_shapes(dtype, rows, hidden, with_dres):
    _bwd_check(rows, hidden, dtype, with_dres)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,hidden", SHAPES)
def test_backward_recomputes_rstd(dtype, rows, hidden):
    """Without an rstd input the kernel's own (the forward's summation) matches the reference's rstd."""
    _bwd_check(rows, hidden, dtype, rows % 2 == 1, own_rstd=True)


def test_backward_without_rstd_needs_eps():
    s = torch.randn(2, 8)
    with pytest.raises(ValueError, match="eps"):
        rmsnorm_backward(s, s, torch.ones(8), None, torch.empty_like(s), torch.empty(8))


def test_long_rows():
    """hidden 1000: 32 values (fp32) or 16 pairs (bf16) per lane, the most a thread keeps in registers."""
    _fwd_check(1, 1000, torch.bfloat16, True)
    _bwd_check(1, 1000, torch.float32, True)
    _bwd_check(2, 1000, torch.bfloat16, False, own_rstd=True)


@pytest.mark.parametrize("threads,hidden,want", [
    (128, 33, "rows per block > 1"),
    (128, 200, "2 warps per row, 2 rows per block"),
    (64, 300, "2 warps per row, re-read"),
])
@pytest.mark.parametrize("dtype", DTYPES)
def test_layouts(monkeypatch, threads, hidden, want, dtype):
    """Several warps per block (the GPU has 8; the simulator's blocks are one warp), with a register budget
    shrunk from 32 to 4 elements so that small rows take the long-row layouts: dweight summed across a block's
    row groups in shared memory, a row's sum across its warps, a second read of rows that do not fit."""
    from surogate.numba_kernels import _rmsnorm_kernels as K
    from surogate.numba_kernels import rmsnorm

    monkeypatch.setattr(rmsnorm, "row_threads", lambda h: threads)
    monkeypatch.setattr(K, "CACHE", 4)
    lay = K.layout(hidden, dtype == torch.bfloat16 and hidden % 2 == 0, threads)
    got = {"rows per block > 1": lay.rpb == 4 and lay.tpr == 32 and lay.cached,
           "2 warps per row, 2 rows per block": lay.tpr == 64 and lay.rpb == 2 and lay.cached,
           "2 warps per row, re-read": lay.tpr == 64 and lay.rpb == 1 and not lay.cached}[want]
    assert got, lay
    _fwd_check(5, hidden, dtype, True)
    _fwd_check(2, hidden, dtype, False)
    _bwd_check(3, hidden, dtype, True)
    _bwd_check(3, hidden, dtype, False, own_rstd=True)  # both row sums across a group's warps


def test_unaligned_bf16_takes_the_scalar_path():
    from surogate.numba_kernels.rmsnorm import _pairs

    buf = torch.randn(4 * 64 + 1).to(torch.bfloat16)
    x = buf[1:].view(4, 64)  # 2-byte aligned only
    assert not _pairs(64, x) and _pairs(64, buf[:-1].view(4, 64)) and not _pairs(63, buf[:252].view(4, 63))
    w = torch.randn(64).to(torch.bfloat16)
    out, rstd = torch.empty(4, 64, dtype=torch.bfloat16), torch.empty(4)
    rmsnorm_forward(x, w, out, rstd, 1e-6)
    close(out, rmsnorm_forward_ref(x, w, 1e-6)[0], torch.bfloat16)


def test_many_partials_colsum(monkeypatch):
    """GPU-like block cap: the backward writes one partial row per 8 rows and colsum adds them in a fixed order
    (the same dweight bits on every run)."""
    from surogate.numba_kernels import _device
    from surogate.numba_kernels.rmsnorm import rmsnorm_bwd_workspace_shape

    monkeypatch.setattr(_device, "_max_resident_blocks", lambda: 1056)
    rows, hidden = 40, 24
    assert rmsnorm_bwd_workspace_shape(rows)[0] == 5
    s, dy, w = torch.randn(rows, hidden), torch.randn(rows, hidden), torch.randn(hidden)
    _, rstd, _ = rmsnorm_forward_ref(s, w, 1e-6)
    ds, dw, dw2 = torch.empty_like(s), torch.empty_like(w), torch.empty_like(w)
    ws = torch.full((5, hidden), float("nan"))
    rmsnorm_backward(dy, s, w, rstd, ds, dw, workspace=ws)
    rmsnorm_backward(dy, s, w, rstd, ds, dw2, workspace=ws)
    close(dw, rmsnorm_backward_ref(dy, s, w, rstd)[1])
    assert torch.equal(dw, dw2)


@pytest.mark.parametrize("resident", [2, 1056])
def test_workspace_shape_matches_the_plan(monkeypatch, resident):
    """The plan (compiler/passes/workspace.py: rms_ws(rows, h, min(rows, resident))) and the backend
    (rms_ws(rows, h, rmsnorm_bwd_workspace_shape(rows)[0])) size the same partials workspace: the kernel's."""
    from surogate.numba_kernels import _device
    from surogate.numba_kernels.rmsnorm import rmsnorm_bwd_workspace_shape
    from surogate.runtime.backends import cuda_sizes as sz

    monkeypatch.setattr(_device, "_max_resident_blocks", lambda: resident)
    for rows in (1, 7, 8, 9, 100, 4096, 65536):
        need = rmsnorm_bwd_workspace_shape(rows)[0]
        assert sz.rms_ws(rows, 128, min(rows, resident)).shape == (need, 128)
        assert sz.rms_ws(rows, 128, need).shape == (need, 128)
    assert rmsnorm_bwd_workspace_shape(4096)[0] == (512 if resident == 1056 else 2)


def test_bf16_pair_rounding_matches_f32_to_bf16():
    """The 32-bit rounding of the packed bf16 stores gives f32_to_bf16's bits (ties, NaN, inf, subnormals)."""
    import numpy as np

    from surogate.numba_kernels._device import get_cuda, helpers, launch

    global cuda  # a module global: the simulator swaps it in the kernel's globals at launch
    cuda = get_cuda()
    h = helpers()
    pack, lo, hi, ref = h.bf16x2_pack, h.bf16x2_lo, h.bf16x2_hi, h.f32_to_bf16

    @cuda.jit
    def kernel(x, packed, ref_bits, back):
        i = cuda.grid(1)
        if i < x.shape[0] // 2:
            p = pack(x[2 * i], x[2 * i + 1])
            packed[i] = p
            ref_bits[2 * i] = ref(x[2 * i])
            ref_bits[2 * i + 1] = ref(x[2 * i + 1])
            back[2 * i] = lo(p)
            back[2 * i + 1] = hi(p)

    bits = [0x3F808000, 0x3F818000, 0x3F80FFFF, 0x3F817FFF, 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00001,
            0x7F800001, 0x00000001, 0x80008000, 0x7F7FFFFF, 0xFF7FFFFF, 0x00000000, 0x80000000, 0x007F8000]
    x = torch.from_numpy(np.array(bits, dtype=np.uint32).view(np.float32).copy())
    x = torch.cat([x, torch.randn(48)])
    packed, ref_bits = torch.zeros(32, dtype=torch.int32), torch.zeros(64, dtype=torch.int16)
    back = torch.zeros(64)
    launch(kernel, 2, 32, x, packed, ref_bits, back)
    assert torch.equal(packed.view(torch.int16), ref_bits)  # little-endian: element 2i in the low half
    assert torch.equal(back.view(torch.int32), (ref_bits.to(torch.int32) << 16))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_res", [False, True])
def test_forward_into_a_column_view(dtype, with_res):
    """out as the first `hidden` columns of a wider matrix (pass fold_lora_up_projection's [x | h]): the same
    values as a contiguous out, rows at the parent's stride, the other columns untouched."""
    rows, hidden, extra = 6, 64, 48
    x, res = torch.randn(rows, hidden).to(dtype), torch.randn(rows, hidden).to(dtype)
    w = (torch.rand(hidden) + 0.5).to(dtype)
    wide = torch.full((rows, hidden + extra), 7.0).to(dtype)
    kw = dict(residual=res, sum_out=torch.empty_like(x)) if with_res else {}
    rmsnorm_forward(x, w, wide[:, :hidden], torch.empty(rows), 1e-6, **kw)
    out = torch.empty_like(x)
    kw2 = dict(residual=res, sum_out=torch.empty_like(x)) if with_res else {}
    rmsnorm_forward(x, w, out, torch.empty(rows), 1e-6, **kw2)
    assert torch.equal(wide[:, :hidden], out)
    assert (wide[:, hidden:] == 7.0).all()
    with pytest.raises(ValueError, match="unit stride"):
        rmsnorm_forward(x, w, torch.empty(rows, 2 * hidden).to(dtype)[:, ::2], torch.empty(rows), 1e-6, **kw)


@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_reads_a_column_view(dtype):
    """dy as the first `hidden` columns of a wider matrix ([dx | dh_G] of fold_lora_up_projection)."""
    rows, hidden = 6, 64
    s, dy = torch.randn(rows, hidden).to(dtype), torch.randn(rows, hidden).to(dtype)
    w = (torch.rand(hidden) + 0.5).to(dtype)
    wide = torch.randn(rows, hidden + 48).to(dtype)
    wide[:, :hidden] = dy
    got, want = torch.empty_like(s), torch.empty_like(s)
    dw_got, dw_want = torch.empty(hidden).to(dtype), torch.empty(hidden).to(dtype)
    rmsnorm_backward(wide[:, :hidden], s, w, None, got, dw_got, eps=1e-6)
    rmsnorm_backward(dy, s, w, None, want, dw_want, eps=1e-6)
    assert torch.equal(got, want) and torch.equal(dw_got, dw_want)
