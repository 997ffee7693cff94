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

from .helpers import close

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
