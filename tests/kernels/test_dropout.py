"""LoRA dropout: the kernel's mask equals the reference's bit for bit; statistics and backward."""

from __future__ import annotations

import pytest
import torch

from surogate.numba_kernels.dropout import dropout_apply, dropout_mask_ref, dropout_ref

from .helpers import DTYPES


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_equals_reference_bitwise(dtype):
    x = torch.randn(3, 41).to(dtype)
    out = torch.empty_like(x)
    seed, offset = (7 << 32) | 12345, (1 << 32) - 50  # counters cross a 2^32 boundary
    dropout_apply(x, out, 0.3, seed, offset)
    assert torch.equal(out, dropout_ref(x, 0.3, seed, offset))


def test_backward_reuses_the_forward_mask():
    x, dy = torch.randn(200), torch.randn(200)
    y, dx = torch.empty_like(x), torch.empty_like(dy)
    dropout_apply(x, y, 0.25, seed=3, offset=100)
    dropout_apply(dy, dx, 0.25, seed=3, offset=100)
    assert torch.equal(y == 0, dx == 0)
    kept = y != 0
    torch.testing.assert_close(dx[kept], dy[kept] / 0.75)


def test_mask_statistics_and_seed_sensitivity():
    n, p = 200_000, 0.05
    m = dropout_mask_ref(seed=11, offset=0, n=n, p=p)
    drop = 1 - m.float().mean().item()
    assert abs(drop - p) < 4 * (p * (1 - p) / n) ** 0.5
    other = dropout_mask_ref(seed=12, offset=0, n=n, p=p)
    assert (m != other).float().mean() > 0.05  # different seed, different mask
    shifted = dropout_mask_ref(seed=11, offset=1, n=n - 1, p=p)
    assert torch.equal(shifted, m[1:])  # the counter is offset + index


def test_zero_p_is_identity_and_bad_p_rejected():
    x, out = torch.randn(10), torch.empty(10)
    dropout_apply(x, out, 0.0, seed=1)
    assert torch.equal(out, x)
    with pytest.raises(ValueError, match="probability"):
        dropout_apply(x, out, 1.0, seed=1)


def test_step_read_from_a_device_tensor_equals_the_host_offset():
    """step [1] int64 on the device: counters start at offset + step * numel (what a captured graph replays)."""
    from surogate.numba_kernels import KERNELS

    x = torch.randn(2, 37)
    step = torch.tensor([5], dtype=torch.int64)
    got, host = torch.empty_like(x), torch.empty_like(x)
    dropout_apply(x, got, 0.4, 11, 3, step=step)
    dropout_apply(x, host, 0.4, 11, 3 + 5 * x.numel())
    assert torch.equal(got, host)
    ref = torch.empty_like(x)
    KERNELS["lora_dropout"].reference(x, ref, 0.4, 11, 3, step=step)
    assert torch.equal(ref, host)
    step.fill_(6)  # a new step through the same tensor: a different mask
    dropout_apply(x, got, 0.4, 11, 3, step=step)
    assert not torch.equal(got == 0, host == 0)


def test_mask_only_bf16_to_bf16_is_exact_and_equals_the_reference():
    """`scale=1.0` (the mask-only LoRA dropout of fp32 adapters on bf16 activations): x * keep in x's dtype, bitwise
    the reference, and the scaled output divided by its factor."""
    x = torch.randn(3, 37, dtype=torch.bfloat16)
    out = torch.empty_like(x)
    dropout_apply(x, out, 0.3, 9, 4, scale=1.0)
    keep = dropout_mask_ref(9, 4, x.numel(), 0.3).reshape(x.shape)
    assert torch.equal(out, x * keep) and torch.equal(out, dropout_ref(x, 0.3, 9, 4, scale=1.0))
    assert 0 < int(keep.sum()) < x.numel()
    scaled = torch.empty(3, 37)
    dropout_apply(x, scaled, 0.3, 9, 4)  # PEFT's dropout(x.float()): fp32 output
    assert torch.allclose(scaled * 0.7, out.float(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("sp", [2, 4])
def test_token_shards_draw_their_part_of_the_whole_rows_mask(sp):
    """Sequence parallelism: shard r of sp along dim 1 (its counters those of the whole rows) drops exactly the
    elements one process drops there, at any step; the cpu kernel table and the torch reference agree."""
    from surogate.numba_kernels import cpu
    from surogate.runtime.reference.common import dropout_mask

    x = torch.randn(3, 4 * sp, 5)
    step = torch.tensor([7], dtype=torch.int64)
    whole = torch.empty_like(x)
    dropout_apply(x, whole, 0.3, 11, 2, step=step)
    t = x.shape[1] // sp
    for r in range(sp):
        part = x[:, r * t : (r + 1) * t].contiguous()
        got, on_cpu = torch.empty_like(part), torch.empty_like(part)
        dropout_apply(part, got, 0.3, 11, 2, step=step, token_shard=(r, sp))
        cpu.dropout_apply(part, on_cpu, 0.3, 11, 2, step=step, token_shard=(r, sp))
        assert torch.equal(got, whole[:, r * t : (r + 1) * t]) and torch.equal(on_cpu, got)
        # the reference backend's mask (torch's generator): the same rule
        full = dropout_mask(x.shape, 0.3, 11, 7)
        assert torch.equal(dropout_mask(part.shape, 0.3, 11, 7, (r, sp)), full[:, r * t : (r + 1) * t])
    assert not torch.equal(whole[:, :t], dropout_ref(x[:, :t].contiguous(), 0.3, 11, 2 + 7 * x.numel()))
