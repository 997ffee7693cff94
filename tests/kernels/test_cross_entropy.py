"""Fused LM-head cross-entropy (chunked rows, tiled vocab) vs reference, and the reference vs F.cross_entropy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from surogate.numba_kernels.cross_entropy import (
    CEWorkspace,
    lmhead_ce_backward,
    lmhead_ce_forward,
    lmhead_ce_forward_backward,
    lmhead_ce_ref,
)

from .helpers import PTX_PREAMBLE, close, run_ptx_script

N, H, V = 11, 16, 50


def _problem(dtype):
    x = torch.randn(N, H).to(dtype)
    w = (torch.randn(V, H) * 0.5).to(dtype)
    # labels on tile edges (0, 23, 24, 49 for tiles of 24) and ignored rows
    labels = torch.tensor([0, 23, 24, 49, -100, 7, 31, -100, 48, 17, 3])
    return x, w, labels


def _tol(dtype):
    return {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunks,tile", [(2, 24), (1, None)])
def test_forward_then_backward_matches_reference(dtype, chunks, tile):
    x, w, labels = _problem(dtype)
    ws = CEWorkspace.allocate(N, V, dtype, "cpu", chunks=chunks, vocab_tile=tile)
    assert ws.logits.numel() < N * V or chunks == 1  # chunking really shrinks the logits buffer
    lse, loss_rows = torch.empty(N), torch.empty(N)
    loss_sum, count = lmhead_ce_forward(x, w, labels, lse, loss_rows, ws)
    ref_loss, ref_count, ref_dx, ref_dw = lmhead_ce_ref(x, w, labels, grad_scale=1.0 / 9)
    assert int(count) == int(ref_count) == 9
    torch.testing.assert_close(loss_sum, ref_loss, **_tol(dtype))
    dx, dw = torch.full_like(x, float("nan")), torch.zeros_like(w)
    lmhead_ce_backward(x, w, labels, lse, 1.0 / 9, dx, dw, ws)
    torch.testing.assert_close(dx.float(), ref_dx.float(), **_tol(dtype))
    torch.testing.assert_close(dw.float(), ref_dw.float(), **_tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_single_sweep_matches_reference(dtype):
    """One vocab tile: the fused row kernel gives loss, lse and dlogits in one launch per chunk."""
    x, w, labels = _problem(dtype)
    ws = CEWorkspace.allocate(N, V, dtype, "cpu", chunks=2)
    lse, rows_loss = torch.empty(N), torch.empty(N)
    dx, dw = torch.empty_like(x), torch.zeros_like(w)
    loss, count = lmhead_ce_forward_backward(x, w, labels, 0.5, lse, rows_loss, dx, None, ws)
    ref_loss, ref_count, ref_dx, _ = lmhead_ce_ref(x, w, labels, grad_scale=0.5)
    assert int(count) == int(ref_count)
    torch.testing.assert_close(loss, ref_loss, **_tol(dtype))
    torch.testing.assert_close(lse, torch.logsumexp((x @ w.t()).float(), -1), **_tol(dtype))
    close(dx, ref_dx, dtype)
    assert torch.all(dw == 0)  # dw=None: the weight gradient is skipped (frozen lm_head under LoRA)


def test_reference_matches_torch_cross_entropy_and_autograd():
    x, w, labels = _problem(torch.float32)
    xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    loss = F.cross_entropy(xg @ wg.t(), labels, ignore_index=-100, reduction="mean")
    loss.backward()
    loss_sum, count, dx, dw = lmhead_ce_ref(x, w, labels, grad_scale=1.0 / 9)
    torch.testing.assert_close(loss_sum / count, loss.detach())
    close(dx, xg.grad)
    close(dw, wg.grad)


def test_workspace_shapes_and_validation():
    sh = CEWorkspace.shapes(rows=4096, vocab=151936, chunks=4)
    assert sh["logits"] == (1024 * 151936,)
    ws = CEWorkspace.allocate(N, V, torch.float32, "cpu", chunks=2)
    x, w, labels = _problem(torch.float32)
    with pytest.raises(ValueError, match="expected x"):
        lmhead_ce_forward(x, w[:, :8], labels, torch.empty(N), torch.empty(N), ws)


def test_fp32_weight_gradient_for_bf16_weights():
    x, w, labels = _problem(torch.bfloat16)
    ws = CEWorkspace.allocate(N, V, torch.bfloat16, "cpu")
    lse, rows_loss = torch.empty(N), torch.empty(N)
    dx, dw = torch.empty_like(x), torch.zeros(V, H)  # fp32 accumulation buffer
    lmhead_ce_forward_backward(x, w, labels, 1.0 / 9, lse, rows_loss, dx, dw, ws)
    _, _, _, ref_dw = lmhead_ce_ref(x, w, labels, grad_scale=1.0 / 9)
    torch.testing.assert_close(dw, ref_dw.float(), atol=2e-2, rtol=2e-2)


# ---------------------------------------------------------------- the kernels on one tile, per read path
# Under the simulator a block has 32 threads; a thread reads UNROLL words per iteration (2 int64, else 4), so the
# widths below give whole iterations and a tail: 268 bf16 = 67 int64 words (64 + 3), 262 = 131 int32 words
# (128 + 3), 133 elements (128 + 5).
ROWS = 6


def _tile_case(dtype, vt, offset):
    """Two tiles [ROWS, vt] (vocab 2 * vt) as views of flat buffers starting `offset` elements in (offset 1:
    unaligned for word loads), and labels: tile A's first, last and a tail column, ignored, tile B's columns."""
    g = torch.Generator().manual_seed(vt + offset)
    full = (torch.randn(ROWS, 2 * vt, generator=g) * 4).to(dtype)
    tiles = []
    for t in (full[:, :vt], full[:, vt:]):
        flat = torch.empty(offset + ROWS * vt, dtype=dtype)
        buf = flat[offset:].view(ROWS, vt)
        buf.copy_(t)
        tiles.append(buf)
    labels = torch.tensor([0, vt - 1, vt - 2, -100, vt, 2 * vt - 1])
    return full.float(), tiles, labels


def _grad_ref(full, labels, lse, scale):
    valid = labels != -100
    p = torch.exp(full - lse[:, None])
    rows = torch.arange(full.shape[0])[valid]
    p[rows, labels[valid]] -= 1.0
    return p * scale * valid[:, None]


def _grad_tol(dtype, scale):
    # rtol: one bf16 rounding of an fp32 value; atol: p - 1 cancels near p = 1 (fp32 error of p times scale)
    return {"atol": 1e-5 * scale, "rtol": 1.6e-2 if dtype == torch.bfloat16 else 1e-4}


TILE_PATHS = [  # (dtype, tile width, offset, words the kernels read it as)
    (torch.bfloat16, 268, 0, 4),
    (torch.bfloat16, 262, 0, 2),
    (torch.bfloat16, 133, 0, 1),  # odd tile
    (torch.bfloat16, 268, 1, 1),  # even but unaligned view
    (torch.float32, 133, 0, 1),
    (torch.float32, 268, 1, 1),
]


@pytest.mark.parametrize("dtype,vt,offset,width", TILE_PATHS)
def test_tile_kernels_match_reference_on_every_read_path(dtype, vt, offset, width):
    from surogate.numba_kernels.cross_entropy import launch_grad, launch_stats, logits_width

    full, (ta, tb), labels = _tile_case(dtype, vt, offset)
    assert logits_width(ta) == logits_width(tb) == width  # the path this case is meant to exercise
    ref_lse = torch.logsumexp(full, -1)
    valid = labels != -100

    # stats: tile A first, tile B merged; the label logit from whichever tile holds it, never for ignored rows
    m, s, tgt = torch.empty(ROWS), torch.empty(ROWS), torch.full((ROWS,), float("nan"))
    launch_stats(ta, labels, 0, True, m, s, tgt)
    launch_stats(tb, labels, vt, False, m, s, tgt)
    torch.testing.assert_close(m + torch.log(s), ref_lse, atol=1e-5, rtol=1e-5)
    assert torch.equal(tgt[valid], full[valid.nonzero()[:, 0], labels[valid]])
    assert torch.isnan(tgt[~valid]).all()

    # gradient in place: tile A with a host scale, tile B with a device scale; ignored rows zero without reading
    ta[3] = float("nan")
    tb[3] = float("nan")
    scale = 3.0
    ref = _grad_ref(full, labels, ref_lse, scale)
    launch_grad(ta, labels, ref_lse, 0, scale, -100)
    launch_grad(tb, labels, ref_lse, vt, torch.tensor([scale]), -100)
    got = torch.cat([ta.float(), tb.float()], 1)
    torch.testing.assert_close(got, ref, **_grad_tol(dtype, scale))
    assert torch.all(got[3] == 0)


@pytest.mark.parametrize("dtype,vt,offset,width", TILE_PATHS)
def test_fused_kernel_matches_reference_on_every_read_path(dtype, vt, offset, width):
    from surogate.numba_kernels.cross_entropy import launch_fused, logits_width

    _, (ta, _), _ = _tile_case(dtype, vt, offset)
    assert logits_width(ta) == width
    full = ta.float().clone()  # (a float32 tile's .float() is the tile itself, overwritten below)
    labels = torch.tensor([0, vt - 1, vt - 2, -100, 1, vt // 2])
    valid = labels != -100
    ref_lse = torch.logsumexp(full, -1)
    lse, loss = torch.empty(ROWS), torch.full((ROWS,), float("nan"))
    scale = 5.0
    launch_fused(ta, labels, scale, -100, lse, loss)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)
    safe = torch.where(valid, labels, 0)
    ref_loss = torch.where(valid, ref_lse - full[torch.arange(ROWS), safe], 0.0)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ta.float(), _grad_ref(full, labels, ref_lse, scale), **_grad_tol(dtype, scale))
    # the scale read on the device (the fused loss op's call) gives the same bits
    _, (tc, _), _ = _tile_case(dtype, vt, offset)
    lse2, loss2 = torch.empty(ROWS), torch.empty(ROWS)
    launch_fused(tc, labels, torch.tensor([scale]), -100, lse2, loss2)
    assert torch.equal(tc, ta) and torch.equal(lse2, lse) and torch.equal(loss2, loss)



_PTX_SCRIPT = PTX_PREAMBLE + r"""
from surogate.numba_kernels import cross_entropy as C

def fake_launch(kernel, grid, block, *args):
    sig = tuple(_numba_type(a) for a in args)
    ptx, _ = cuda.compile_ptx(kernel.py_func, sig, cc=(9, 0))
    wide = [len(re.findall(r"ld\.global(?:\.nc)?\.[bsu]%d\s" % b, ptx)) for b in (64, 32, 16)]
    local = sum(1 for ln in ptx.splitlines() if ".local" in ln and not ln.strip().startswith("//"))
    name = kernel.py_func.__qualname__.split(".")[0]
    scale = "device" if isinstance(args[2 if name == "_fused_kernel" else 4], torch.Tensor) else "host"
    print(name, sig[0].dtype, scale, *wide, local)

C.launch = fake_launch
lab, f = torch.zeros(3, dtype=torch.int64), torch.zeros(3)
for vt, dt in ((8, torch.bfloat16), (6, torch.bfloat16), (7, torch.bfloat16), (8, torch.float32)):
    b = torch.zeros(3, vt, dtype=dt)
    C.launch_stats(b, lab, 0, True, f, f, f)
    C.launch_grad(b, lab, f, 0, 1.0, -100)
    C.launch_grad(b, lab, f, 0, torch.ones(1), -100)
    C.launch_fused(b, lab, 1.0, -100, f, f)
    C.launch_fused(b, lab, torch.ones(1), -100, f, f)
print("PTX-DONE")
"""


@pytest.mark.slow
def test_every_ce_variant_compiles_to_ptx_with_wide_loads():
    """sm_90 PTX of the int64 / int32 word, bf16 scalar and float32 variants: the word kernels load only words
    (labels are int64 too: one more 64-bit load), UNROLL words per iteration plus the tail's, and the unrolled
    per-thread word buffers live in registers (no local memory)."""
    rows = run_ptx_script(_PTX_SCRIPT)
    got = {(n, dt, sc): tuple(int(v) for v in vals) for n, dt, sc, *vals in rows}
    assert len(got) == 20
    assert all(v[3] == 0 for v in got.values()), got
    for (name, dt, _), (l64, l32, l16, _) in got.items():
        if dt == "int64":  # 2 words per iteration + tail + labels (stats and fused: + the label's word)
            assert (l32, l16) == (0, 0) and l64 >= 4, (name, got)
        elif dt == "int32":  # 4 words per iteration + tail
            assert l16 == 0 and l32 >= 5, (name, got)
        elif dt == "int16":
            assert l16 >= 5, (name, got)
