"""RoPE kernels (table and fused) vs reference, and the reference vs transformers' apply_rotary_pos_emb."""

from __future__ import annotations

import pytest
import torch

from surogate.numba_kernels.rope import (
    rope_backward,
    rope_forward,
    rope_forward_ref,
    rope_fused_backward,
    rope_fused_forward,
    rope_fused_ref,
    rope_tables_ref,
)

from .helpers import DTYPES, close


def _inv_freq(d: int, theta: float = 10000.0) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))


def _packed_positions() -> torch.Tensor:
    # two packed documents: positions restart at the boundary
    return torch.tensor([0, 1, 2, 3, 4, 0, 1, 2], dtype=torch.int32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_table_forward_backward_match_reference(dtype):
    pos = _packed_positions()
    x = torch.randn(pos.numel(), 3, 10).to(dtype)  # head_dim 10: half = 5 (odd)
    cos, sin = rope_tables_ref(_inv_freq(10), 16)
    out = torch.empty_like(x)
    rope_forward(x, out, pos, cos, sin)
    close(out, rope_forward_ref(x, pos, cos, sin), dtype)
    dx = torch.empty_like(x)
    rope_backward(out, dx, pos, cos, sin)
    close(dx, rope_forward_ref(out, pos, cos, sin, backward=True), dtype)
    if dtype == torch.float32:
        close(dx, x)  # a rotation: the backward undoes the forward


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_matches_table_and_reference(dtype):
    pos = torch.tensor([5, 0, 17, 3], dtype=torch.int64)
    inv = _inv_freq(8)
    x = torch.randn(4, 2, 8).to(dtype)
    out = torch.empty_like(x)
    rope_fused_forward(x, out, pos, inv, attention_scaling=1.25)
    close(out, rope_fused_ref(x, pos, inv, attention_scaling=1.25), dtype)
    cos, sin = rope_tables_ref(inv, 32, attention_scaling=1.25)
    close(out, rope_forward_ref(x, pos, cos, sin), dtype)
    dx = torch.empty_like(x)
    rope_fused_backward(out, dx, pos, inv, attention_scaling=1.25)
    close(dx, rope_fused_ref(out, pos, inv, 1.25, backward=True), dtype)


def test_in_place_on_packed_qkv_view():
    """Rotate only the q and k heads of a packed qkv buffer, in place; v is untouched."""
    t, hq, hk, d = 5, 2, 1, 6
    qkv = torch.randn(t, (hq + 2 * hk) * d)
    before = qkv.clone()
    pos = torch.arange(t, dtype=torch.int32)
    cos, sin = rope_tables_ref(_inv_freq(d), 8)
    qk = qkv.view(t, hq + 2 * hk, d)[:, : hq + hk]
    rope_forward(qk, qk, pos, cos, sin)
    expect = rope_forward_ref(before.view(t, -1, d)[:, : hq + hk], pos, cos, sin)
    close(qkv.view(t, -1, d)[:, : hq + hk], expect)
    assert torch.equal(qkv.view(t, -1, d)[:, hq + hk :], before.view(t, -1, d)[:, hq + hk :])


def test_reference_matches_transformers_apply_rotary_pos_emb():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    rot = LlamaRotaryEmbedding(cfg)
    b, s, d = 2, 7, 16
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2], [3, 4, 5, 6, 7, 8, 9]])  # packed restart in row 0
    q, k = torch.randn(b, 4, s, d), torch.randn(b, 2, s, d)
    cos, sin = rot(q, pos)
    q_hf, k_hf = apply_rotary_pos_emb(q, k, cos, sin)
    ct, st = rope_tables_ref(rot.inv_freq, 16, rot.attention_scaling)
    flat = pos.reshape(-1)
    q_ours = rope_forward_ref(q.transpose(1, 2).reshape(b * s, 4, d), flat, ct, st)
    k_ours = rope_fused_ref(k.transpose(1, 2).reshape(b * s, 2, d), flat, rot.inv_freq, rot.attention_scaling)
    torch.testing.assert_close(q_ours, q_hf.transpose(1, 2).reshape(b * s, 4, d), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(k_ours, k_hf.transpose(1, 2).reshape(b * s, 2, d), rtol=1e-6, atol=1e-6)
    # backward: autograd through HF's rotation equals our inverse rotation
    qg = q.clone().requires_grad_(True)
    q_hf2, _ = apply_rotary_pos_emb(qg, k, cos, sin)
    dq = torch.randn_like(q_hf2)
    q_hf2.backward(dq)
    d_ours = rope_forward_ref(dq.transpose(1, 2).reshape(b * s, 4, d), flat, ct, st, backward=True)
    torch.testing.assert_close(d_ours, qg.grad.transpose(1, 2).reshape(b * s, 4, d), rtol=1e-6, atol=1e-6)


def test_bf16_kernel_close_to_transformers_bf16():
    """HF rounds cos/sin and each product to bf16; the kernel rounds once from fp32 math: within ~2 ulp."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    cfg = LlamaConfig(hidden_size=32, num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    rot = LlamaRotaryEmbedding(cfg)
    s, d = 6, 16
    pos = torch.tensor([[0, 1, 2, 0, 1, 5]])
    q = torch.randn(1, 2, s, d, dtype=torch.bfloat16)
    cos, sin = rot(q, pos)
    q_hf, _ = apply_rotary_pos_emb(q, q, cos, sin)
    x = q.transpose(1, 2).reshape(s, 2, d).contiguous()
    out = torch.empty_like(x)
    rope_fused_forward(x, out, pos.reshape(-1), rot.inv_freq, rot.attention_scaling)
    torch.testing.assert_close(out.float(), q_hf.transpose(1, 2).reshape(s, 2, d).float(), atol=3e-2, rtol=2e-2)


def test_rope_tables_are_built_on_the_device_of_inv_freq():
    # the cuda backend builds its tables from a device inv_freq: positions must live there too
    cos, sin = rope_tables_ref(_inv_freq(8).to("meta"), 16)
    assert cos.device.type == sin.device.type == "meta"
    assert cos.shape == sin.shape == (16, 4)
