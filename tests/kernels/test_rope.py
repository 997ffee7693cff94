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

from .helpers import DTYPES, PTX_PREAMBLE, close, run_ptx_script


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


# -- wide path (int32 / int64 words of bf16, two word pairs per thread, float32 pairs) vs the scalar kernel -----


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t.view(torch.int32)


def _scalar(x, out, pos, cos, sin, inv, scaling, sign):
    """The scalar kernel (the path before the wide one, and the fallback), launched directly."""
    from surogate.numba_kernels import rope as R
    from surogate.numba_kernels._device import grid_for, launch, threads

    fused = inv is not None
    k = R._kernel(x.dtype, out.dtype, fused)
    if fused:
        cos = sin = inv.view(1, -1)
    launch(k, grid_for(x.shape[0], 1), threads(), x, out, pos, cos, sin, inv if fused else cos.reshape(-1),
           float(scaling), float(sign))


def _x(t, h, d, dtype, seed):
    x = torch.randn(t, h, d, generator=torch.Generator().manual_seed(seed)) * 2
    flat = x.view(-1)
    for i, v in enumerate([float("nan"), float("inf"), -float("inf"), 1e-40, -0.0, 3e38]):
        flat[(7 * i + 1) % flat.numel()] = v
    return x.to(dtype)


def _all_variants(x, pos, d, expect_width):
    """Forward and backward, table and fused, into a new buffer and in place: the same bits as the scalar kernel."""
    from surogate.numba_kernels import rope as R

    assert R._width(x, x) == expect_width
    inv = _inv_freq(d)
    cos, sin = rope_tables_ref(inv, 16, attention_scaling=1.25)
    for fused in (False, True):
        for sign in (1.0, -1.0):
            if fused:
                fn = rope_fused_forward if sign > 0 else rope_fused_backward
                new = lambda a, b, fn=fn: fn(a, b, pos, inv, 1.25)  # noqa: E731
            else:
                fn = rope_forward if sign > 0 else rope_backward
                new = lambda a, b, fn=fn: fn(a, b, pos, cos, sin)  # noqa: E731
            old = torch.empty_like(x)
            _scalar(x, old, pos, cos, sin, inv if fused else None, 1.25, sign)
            out = torch.empty_like(x)
            new(x, out)
            assert torch.equal(_bits(out), _bits(old)), (fused, sign)
            y = x.clone()
            new(y, y)  # in place
            assert torch.equal(_bits(y), _bits(old)), (fused, sign)
    if x.dtype == torch.bfloat16:  # table path: the same fp32 products as the reference, rounded once
        out = torch.empty_like(x)
        rope_forward(x, out, pos, cos, sin)
        ref = rope_forward_ref(x, pos, cos, sin)
        nan = torch.isnan(ref)  # NaN payloads differ by convention (torch propagates, the kernels quiet)
        assert torch.equal(torch.isnan(out), nan)
        assert torch.equal(_bits(out)[~nan], _bits(ref)[~nan])


# inf / huge inputs overflow float32 products in the simulator (NumPy warns; a GPU does not)
SPECIAL_VALUES = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning",
                                            "ignore:invalid value encountered:RuntimeWarning")


@SPECIAL_VALUES
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,d", [(2, 128), (3, 64), (1, 8), (3, 4), (2, 12), (2, 10), (1, 2)])
def test_wide_path_same_bits_as_scalar_kernel(dtype, heads, d):
    pos = torch.tensor([0, 15, 3], dtype=torch.int64)
    half = d // 2
    width = 1 if dtype == torch.float32 else 4 if half % 4 == 0 else 2 if half % 2 == 0 else 0
    _all_variants(_x(3, heads, d, dtype, seed=d + heads), pos, d, width)


@pytest.mark.parametrize("dtype", DTYPES)
def test_wide_path_on_packed_qkv_view_in_place(dtype):
    """q and k heads of a packed bf16 qkv buffer (head_dim 64): int64 words on a strided view; v untouched."""
    t, hq, hk, d = 3, 4, 2, 64
    qkv = torch.randn(t, (hq + 2 * hk) * d).to(dtype)
    before = qkv.clone()
    pos = torch.tensor([2, 0, 1], dtype=torch.int32)
    cos, sin = rope_tables_ref(_inv_freq(d), 4)
    qk = qkv.view(t, hq + 2 * hk, d)[:, : hq + hk]
    from surogate.numba_kernels import rope as R

    assert R._width(qk, qk) == (1 if dtype == torch.float32 else 4)
    expect = torch.empty_like(qk)
    _scalar(qk, expect, pos, cos, sin, None, 1.0, 1.0)
    rope_forward(qk, qk, pos, cos, sin)
    assert torch.equal(_bits(qkv.view(t, -1, d)[:, : hq + hk]), _bits(expect))
    assert torch.equal(qkv.view(t, -1, d)[:, hq + hk :], before.view(t, -1, d)[:, hq + hk :])


@SPECIAL_VALUES
def test_misaligned_view_and_mixed_dtypes_take_the_scalar_path():
    from surogate.numba_kernels import rope as R

    t, h, d = 3, 2, 8
    buf = _x(1, 1, t * h * d + 2, torch.bfloat16, seed=4).view(-1)
    pos = torch.tensor([1, 0, 2], dtype=torch.int64)
    x = buf[1 : 1 + t * h * d].view(t, h, d)  # odd element offset: 2-byte aligned only
    assert x.data_ptr() % 4
    _all_variants(x, pos, d, 0)
    x2 = buf[2 : 2 + t * h * d].view(t, h, d)  # 4-byte aligned: int32 words, not int64
    _all_variants(x2, pos, d, 2)
    # bf16 in, fp32 out: the scalar kernel
    out = torch.empty(t, h, d)
    assert R._width(x2, out) == 0
    cos, sin = rope_tables_ref(_inv_freq(d), 4)
    rope_forward(x2, out, pos, cos, sin)
    old = torch.empty_like(out)
    _scalar(x2, old, pos, cos, sin, None, 1.0, 1.0)
    assert torch.equal(_bits(out), _bits(old))


_PTX_SCRIPT = PTX_PREAMBLE + r"""
from surogate.numba_kernels import rope as R

def contractions(lines):
    # {(shared array of the fma's multiplicand, addend's op, shared array of the addend's product)} over the
    # rotation's fmas; arrays by declaration order: 0 = cos (sc), 1 = sin (ss)
    arrays = [m.group(1) for ln in lines for m in [re.match(r"\.visible \.shared .* (\w+)\[", ln)] if m]
    defs = {}
    for ln in lines:
        m = re.match(r"([\w.]+)\s+(%\w+),\s*(.*?);", ln)
        if m:
            defs[m.group(2)] = (m.group(1), re.findall(r"[%\w]+", m.group(3)))
    def array(reg, depth=0):  # the shared array an address register points into
        op, ops = defs.get(reg, ("", []))
        for o in ops:
            if o in arrays:
                return arrays.index(o)
        for o in ops:
            if o.startswith("%") and depth < 20:
                a = array(o, depth + 1)
                if a is not None:
                    return a
        return None
    def shared_operand(ops):
        for o in ops:
            op, src = defs.get(o, ("", []))
            if op.startswith("ld.shared"):
                return array(src[0])
        return None
    found = set()
    for op, ops in defs.values():
        if op == "fma.rn.f32" and shared_operand(ops[:2]) is not None:
            mop, mops = defs.get(ops[2], ("", []))
            found.add((shared_operand(ops[:2]), mop, shared_operand(mops)))
    return found

def fake_launch(kernel, grid, block, *args):
    sig = tuple(_numba_type(a) for a in args)
    ptx, _ = cuda.compile_ptx(kernel.py_func, sig, cc=(9, 0))
    lines = [ln.strip() for ln in ptx.splitlines()]
    wide = {b: sum(1 for ln in lines if re.match(r"ld\.global(?:\.nc)?\.[bsu]%d\s" % b, ln)) for b in (64, 32)}
    fmas = "|".join(f"{a}:{op}:{b}" for a, op, b in sorted(contractions(lines)))
    print(kernel.py_func.__qualname__.split(".")[0], sig[0].dtype, wide[64], wide[32], fmas, flush=True)

R.launch = fake_launch
bf, f32 = torch.bfloat16, torch.float32
pos = torch.zeros(3, dtype=torch.int64)
for d, dt in ((128, bf), (64, bf), (4, bf), (10, bf), (128, f32)):
    x = torch.zeros(3, 2, d, dtype=dt)
    R.rope_forward(x, x, pos, torch.zeros(8, d // 2), torch.zeros(8, d // 2))
    R.rope_fused_backward(x, x, pos, torch.zeros(d // 2), 1.0)
x = torch.zeros(3, 2, 8, dtype=bf)
R.rope_forward(x, x.float(), pos, torch.zeros(8, 4), torch.zeros(8, 4))
print("PTX-DONE")
"""


@pytest.mark.slow
def test_every_rope_variant_compiles_to_ptx_with_wide_loads():
    """sm_90 PTX of the int64 / int32 word, float32 and scalar variants, table and fused (the registry cases
    build only some): the word kernels load x as 64- / 32-bit words (two word pairs per iteration), and every
    variant rounds the rotation as the scalar kernel does (its one contracted product, read from the PTX)."""
    rows = run_ptx_script(_PTX_SCRIPT)
    assert len(rows) == 11, rows
    # bit-identity on a GPU: NVVM contracts the scalar kernel's x2 * c + x1 * s into fma(x1, s, x2 * c); every
    # variant, scalar and wide, table and fused, must compute exactly that (sin a multiplicand, cos * x2 the addend)
    assert {r[4] for r in rows} == {"1:mul.f32:0"}, rows
    for name, dt, w64, w32, _ in rows:
        if name == "_wide_kernel" and dt == "int64":
            assert int(w64) >= 4, rows  # x1 and x2 words of two items
        if name == "_wide_kernel" and dt == "int32":
            assert int(w32) >= 4, rows
    names = {(r[0], r[1]) for r in rows}
    assert names == {("_wide_kernel", "int64"), ("_wide_kernel", "int32"), ("_wide_kernel", "float32"),
                     ("_kernel", "int16")}
