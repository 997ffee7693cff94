"""8-bit AdamW: kernel vs reference (bit-exact in the simulator), and the reference vs torch.optim.AdamW."""

from __future__ import annotations

import pytest
import torch

from surogate.numba_kernels.adamw8bit import (
    adamw8bit_state,
    adamw8bit_step,
    adamw8bit_step_ref,
    adamw_hparams,
)

N = 300  # two quantization blocks of 256, the second partial


def _clone_state(s):
    return {k: v.clone() for k, v in s.items()}


@pytest.mark.parametrize(
    "p_dtype,g_dtype,use_master",
    [(torch.float32, torch.float32, False), (torch.bfloat16, torch.bfloat16, True), (torch.bfloat16, torch.float32, False)],
)
def test_kernel_matches_reference_over_steps(p_dtype, g_dtype, use_master):
    p0 = torch.randn(N)
    param_k, param_r = p0.to(p_dtype), p0.to(p_dtype)
    master_k = p0.clone() if use_master else None
    master_r = p0.clone() if use_master else None
    st_k = adamw8bit_state(N)
    st_r = _clone_state(st_k)
    for step in range(1, 4):
        grad = (torch.randn(N) * (10.0 ** -step)).to(g_dtype)
        hp = adamw_hparams(1e-2, 0.9, 0.999, 1e-8, 0.1, step, grad_scale=0.5)
        adamw8bit_step(param_k, grad, st_k, hp, master_k)
        adamw8bit_step_ref(param_r, grad, st_r, hp, master_r)
        for key in st_k:
            assert torch.equal(st_k[key], st_r[key]), (step, key)
        assert torch.equal(param_k, param_r)
        if use_master:
            assert torch.equal(master_k, master_r)
            assert torch.equal(param_k, master_k.to(p_dtype))


def _regression_problem():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 48, generator=g)
    w_true = torch.randn(48, 40, generator=g)
    y = x @ w_true + 0.01 * torch.randn(256, 40, generator=g)
    return x, y


@pytest.fixture
def one_thread():
    # torch's multi-threaded searchsorted is pathologically slow on a small, shared CPU
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_reference_tracks_torch_adamw_over_100_steps(one_thread):
    """The 8-bit optimizer follows fp32 torch.optim.AdamW (the gap is printed for the report).

    Each re-quantization of m and v costs ~1-2% relative error per element (median; 8-bit dynamic map),
    so over 100 steps the weights drift ~4-5% (relative L2) from fp32 AdamW while the loss stays within
    ~1%; for scale, fp32 AdamW with 3% multiplicative gradient noise drifts ~0.2%. bitsandbytes' own
    AdamW8bit shows the same drift on this problem (4.51e-2 max), and stays within 0.35% of this
    implementation (test_bnb_compat.py, run where bitsandbytes is installed).
    """
    x, y = _regression_problem()
    w_ref = torch.zeros(48, 40, requires_grad=True)
    opt = torch.optim.AdamW([w_ref], lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, foreach=False)
    w8 = torch.zeros(48, 40)
    state = adamw8bit_state(w8.numel())
    rel_gaps, losses = [], []
    for step in range(1, 101):
        opt.zero_grad()
        loss = ((x @ w_ref - y) ** 2).mean()
        loss.backward()
        opt.step()
        w8g = w8.clone().requires_grad_(True)
        loss8 = ((x @ w8g - y) ** 2).mean()
        loss8.backward()
        adamw8bit_step_ref(w8, w8g.grad, state, adamw_hparams(1e-2, 0.9, 0.999, 1e-8, 0.1, step))
        rel_gaps.append(((w8 - w_ref.detach()).norm() / w_ref.detach().norm()).item())
        losses.append((loss.item(), loss8.item()))
    print(f"8-bit AdamW vs torch AdamW after 100 steps: max relative weight gap {max(rel_gaps):.2e}, "
          f"final {rel_gaps[-1]:.2e}; loss {losses[-1][1]:.4f} vs {losses[-1][0]:.4f}")
    assert max(rel_gaps) < 0.07
    assert abs(losses[-1][1] - losses[-1][0]) / losses[-1][0] < 0.02
    assert losses[-1][1] < losses[0][1] * 0.3  # it really trains


def test_first_step_equals_torch_adamw_closely():
    """Step 1 starts from zero moments, so only the moment quantization separates it from torch."""
    p = torch.randn(N)
    grad = torch.randn(N)
    w = p.clone().requires_grad_(True)
    opt = torch.optim.AdamW([w], lr=1e-3, weight_decay=0.01, foreach=False)
    w.grad = grad.clone()
    opt.step()
    ours = p.clone()
    adamw8bit_step(ours, grad, adamw8bit_state(N), adamw_hparams(1e-3, 0.9, 0.999, 1e-8, 0.01, 1))
    torch.testing.assert_close(ours, w.detach(), atol=1e-6, rtol=1e-6)


def test_argument_checks():
    st = adamw8bit_state(N)
    hp = adamw_hparams(1e-3, 0.9, 0.999, 1e-8, 0.0, 1)
    with pytest.raises(ValueError, match="elements"):
        adamw8bit_step(torch.zeros(N), torch.zeros(N - 1), st, hp)
    with pytest.raises(TypeError, match="master"):
        adamw8bit_step(torch.zeros(N, dtype=torch.bfloat16), torch.zeros(N), st, hp, torch.zeros(N, dtype=torch.bfloat16))
