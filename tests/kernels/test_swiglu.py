"""SwiGLU kernels vs reference, and the reference vs HF's MLP activation and autograd."""

from __future__ import annotations

import pytest
import torch

from surogate.numba_kernels.swiglu import (
    swiglu_backward,
    swiglu_backward_ref,
    swiglu_forward,
    swiglu_forward_ref,
)

from .helpers import DTYPES, PTX_PREAMBLE, close, run_ptx_script


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,cols", [(1, 1), (3, 37), (2, 70)])
def test_forward_backward_match_reference(dtype, rows, cols):
    g = (torch.randn(rows, cols) * 3).to(dtype)
    u = torch.randn(rows, cols).to(dtype)
    out = torch.empty_like(g)
    swiglu_forward(g, u, out)
    close(out, swiglu_forward_ref(g, u), dtype)
    d = torch.randn(rows, cols).to(dtype)
    dg, du = torch.empty_like(g), torch.empty_like(u)
    swiglu_backward(d, g, u, dg, du)
    rg, ru = swiglu_backward_ref(d, g, u)
    close(dg, rg, dtype)
    close(du, ru, dtype)


def test_fused_gate_up_views():
    """gate and up as the two halves of one [rows, 2 * cols] buffer (strided rows)."""
    rows, cols = 4, 19
    gu = torch.randn(rows, 2 * cols)
    out = torch.full((rows, 2 * cols), -7.0)
    swiglu_forward(gu[:, :cols], gu[:, cols:], out[:, cols:])
    close(out[:, cols:], swiglu_forward_ref(gu[:, :cols], gu[:, cols:]))
    assert torch.all(out[:, :cols] == -7.0)  # nothing written outside the view


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_matches_hf_activation_and_autograd(dtype):
    from transformers.activations import ACT2FN

    g = torch.randn(6, 11, dtype=dtype, requires_grad=True)
    u = torch.randn(6, 11, dtype=dtype, requires_grad=True)
    y = ACT2FN["silu"](g) * u  # HF LlamaMLP / Qwen3MLP: act_fn(gate_proj(x)) * up_proj(x)
    assert torch.equal(swiglu_forward_ref(g.detach(), u.detach()), y.detach())
    d = torch.randn_like(y)
    y.backward(d)
    rg, ru = swiglu_backward_ref(d, g.detach(), u.detach())
    close(rg, g.grad, dtype)
    close(ru, u.grad, dtype)


# -- wide path (int32 / int64 words of bf16, 4-way ILP for float32) vs the scalar kernels: the same bits ----------

cuda = None  # numba.cuda for the test kernel below (bound at its test)

SPECIAL = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-40, -1e-40, 3e38, -88.0, 90.0, 1.00390625]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t.view(torch.int32)


def _inputs(rows, cols, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    ts = [torch.randn(rows, cols, generator=gen) * s for s in (3.0, 1.0, 1.0)]
    flat = ts[0].view(-1)  # special values (NaN, inf, denormals, huge) in gate, up and dout
    for i, v in enumerate(SPECIAL[: flat.numel()]):
        flat[i] = v
        ts[1].view(-1)[-1 - i] = v
        ts[2].view(-1)[(3 * i) % flat.numel()] = v
    return [t.to(dtype) for t in ts]


def _scalar(gate, up, dout):
    """The scalar kernels (the path before the wide one, and the fallback), launched directly."""
    from surogate.numba_kernels import swiglu as S
    from surogate.numba_kernels._device import grid_for, launch, threads

    out, dg, du = torch.empty_like(gate), torch.empty_like(gate), torch.empty_like(up)
    grid = grid_for(gate.shape[0], 1)
    launch(S._fwd_kernel(gate.dtype, up.dtype, out.dtype), grid, threads(), gate, up, out)
    launch(S._bwd_kernel(dout.dtype, gate.dtype, up.dtype), grid, threads(), dout, gate, up, dg, du)
    return out, dg, du


def _check_same_bits(gate, up, dout, expect_width):
    from surogate.numba_kernels import swiglu as S

    out, dg, du = torch.empty_like(gate), torch.empty_like(gate), torch.empty_like(up)
    assert S._width(gate, up, out) == expect_width
    swiglu_forward(gate, up, out)
    swiglu_backward(dout, gate, up, dg, du)
    for new, old in zip((out, dg, du), _scalar(gate, up, dout), strict=True):
        assert torch.equal(_bits(new), _bits(old))


# inf / huge inputs overflow float32 products in the simulator (NumPy warns; a GPU does not)
SPECIAL_VALUES = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning",
                                            "ignore:invalid value encountered:RuntimeWarning")


@SPECIAL_VALUES
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,cols", [(1, 1), (2, 3), (3, 7), (2, 33), (2, 6), (3, 8), (1, 40), (2, 300)])
def test_wide_path_same_bits_as_scalar_kernel(dtype, rows, cols):
    g, u, d = _inputs(rows, cols, dtype, seed=cols)
    if dtype == torch.float32:
        width = 1
    else:
        width = 4 if cols % 4 == 0 else 2 if cols % 2 == 0 else 0
    _check_same_bits(g, u, d, width)
    if dtype == torch.bfloat16 and rows * cols > 4:  # and close to the reference where it is finite
        fin = torch.isfinite(g.float()) & torch.isfinite(u.float()) & (g.float().abs() < 1e30)
        out = torch.empty_like(g)
        swiglu_forward(g, u, out)
        close(out[fin], swiglu_forward_ref(g, u)[fin], dtype)


@SPECIAL_VALUES
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_gate_up_views_wide(dtype):
    """Halves of one [rows, 2 * cols] buffer: strided rows, word views when cols allows (4: int64, 2: int32)."""
    for cols, width in ((12, 4), (10, 2), (9, 0)):
        gu, _, d = _inputs(3, 2 * cols, dtype, seed=cols)
        width = 1 if dtype == torch.float32 else width
        _check_same_bits(gu[:, :cols], gu[:, cols:], d[:, :cols], width)
        dgu = torch.full((3, 2 * cols), -7.0, dtype=dtype)
        swiglu_backward(d[:, :cols], gu[:, :cols], gu[:, cols:], dgu[:, :cols], dgu[:, cols:])
        rg, ru = swiglu_backward_ref(d[:, :cols], gu[:, :cols], gu[:, cols:])
        fin = torch.isfinite(rg.float()) & torch.isfinite(ru.float())
        close(dgu[:, :cols][fin], rg[fin], dtype)


@SPECIAL_VALUES
def test_misaligned_and_mixed_take_the_scalar_path():
    from surogate.numba_kernels import swiglu as S

    buf = _inputs(1, 80, torch.bfloat16, seed=3)
    g, u, d = (b.view(-1)[1:73].view(3, 24) for b in buf)  # odd element offset: 2-byte aligned only
    assert g.data_ptr() % 4
    _check_same_bits(g, u, d, 0)
    out = torch.empty(3, 24, dtype=torch.bfloat16)
    swiglu_forward(g, u, out)
    ref = swiglu_forward_ref(g, u)
    fin = torch.isfinite(ref.float())
    close(out[fin], ref[fin], torch.bfloat16)
    # an offset of 2 elements: int32 words but not int64
    g2, u2, d2 = (b.view(-1)[2:74].view(3, 24) for b in buf)
    _check_same_bits(g2, u2, d2, 2)
    # mixed dtypes (bf16 gate, fp32 up): scalar kernel
    g3, u3, d3 = _inputs(2, 16, torch.bfloat16, seed=5)
    u3 = u3.float()
    assert S._width(g3, u3, torch.empty_like(g3)) == 0
    out3, dg3, du3 = torch.empty_like(g3), torch.empty_like(g3), torch.empty_like(u3)
    swiglu_forward(g3, u3, out3)
    swiglu_backward(d3, g3, u3, dg3, du3)
    for new, old in zip((out3, dg3, du3), _scalar(g3, u3, d3), strict=True):
        assert torch.equal(_bits(new), _bits(old))


def test_vec_pack_unpack_bit_exact():
    """_vec's pack2/pack4 round exactly as helpers().f32_to_bf16 (NaN, inf, denormals, ties, signed zeros),
    and unpack2/unpack4 are helpers().bf16_to_f32 (little-endian element order)."""
    from surogate.numba_kernels._device import get_cuda, helpers, launch
    from surogate.numba_kernels._vec import vec_helpers, word_view

    global cuda  # a module global: the simulator swaps `cuda` in a kernel's globals at launch
    cuda = get_cuda()
    h, v = helpers(), vec_helpers()
    f2b, b2f = h.f32_to_bf16, h.bf16_to_f32
    pack2, pack4, unpack2, unpack4 = v.pack2, v.pack4, v.unpack2, v.unpack4

    # patterns: ties (low half exactly 0x8000, even and odd kept bit), around them, NaNs with payloads (quiet and
    # signalling, both signs), infinities, denormals, zeros, the largest finite values (round to inf)
    hi = torch.tensor([0x0000, 0x0001, 0x007F, 0x0080, 0x3F80, 0x3F81, 0x7F7F, 0x7F80, 0x7F81, 0x7FC0, 0x7FFF,
                       0x8000, 0x8001, 0x80FF, 0xBF80, 0xFF7F, 0xFF80, 0xFF81, 0xFFC1, 0xFFFF], dtype=torch.int64)
    lo = torch.tensor([0x0000, 0x0001, 0x7FFF, 0x8000, 0x8001, 0xFFFF, 0x4000], dtype=torch.int64)
    pats = ((hi[:, None] << 16) | lo[None, :]).reshape(-1)
    pats = torch.cat([pats, torch.randint(0, 2**32, (80,), generator=torch.Generator().manual_seed(1))])
    n = pats.numel()  # 220: divisible by 4
    x = (((pats + 2**31) % 2**32) - 2**31).to(torch.int32).view(torch.float32)

    @cuda.jit
    def kern(x, ref, w2, w4, bf, bf2, bf4, unref, un2, un4):
        i = cuda.grid(1)
        if i < x.shape[0]:
            ref[i] = f2b(x[i])
            unref[i] = b2f(bf[i])
        if i < w2.shape[0]:
            w2[i] = pack2(x[2 * i], x[2 * i + 1])
            a, b = unpack2(bf2[i])
            un2[2 * i] = a
            un2[2 * i + 1] = b
        if i < w4.shape[0]:
            w4[i] = pack4(x[4 * i], x[4 * i + 1], x[4 * i + 2], x[4 * i + 3])
            a, b, c, d = unpack4(bf4[i])
            un4[4 * i] = a
            un4[4 * i + 1] = b
            un4[4 * i + 2] = c
            un4[4 * i + 3] = d

    ref = torch.empty(n, dtype=torch.int16)
    w2, w4 = torch.empty(n // 2, dtype=torch.int32), torch.empty(n // 4, dtype=torch.int64)
    bf = (pats >> 16).to(torch.int32).to(torch.int16)  # every bf16 pattern of the list, NaNs included
    unref, un2, un4 = torch.empty(n), torch.empty(n), torch.empty(n)
    bfv = bf.view(torch.bfloat16)
    launch(kern, (n + 63) // 64, 64, x, ref, w2, w4, bf, word_view(bfv, 2), word_view(bfv, 4), unref, un2, un4)
    assert torch.equal(w2.view(torch.int16), ref)
    assert torch.equal(w4.view(torch.int16), ref)
    fin = ~torch.isnan(x)  # torch's cast agrees on every non-NaN value (NaN payloads differ by convention)
    assert torch.equal(ref[fin], x.to(torch.bfloat16).view(torch.int16)[fin])
    for un in (un2, un4):
        assert torch.equal(un.view(torch.int32), unref.view(torch.int32))
    assert torch.equal(unref.view(torch.int32), bf.to(torch.int32) << 16)


_PTX_SCRIPT = PTX_PREAMBLE + r"""
from surogate.numba_kernels import swiglu as S

def fake_launch(kernel, grid, block, *args):
    sig = tuple(_numba_type(a) for a in args)
    ptx, _ = cuda.compile_ptx(kernel.py_func, sig, cc=(9, 0))
    wide = {b: len(re.findall(r"ld\.global(?:\.nc)?\.[bsu]%d\s" % b, ptx)) for b in (64, 32, 16)}
    print(kernel.py_func.__qualname__.split(".")[0], sig[0].dtype, wide[64], wide[32], wide[16])

S.launch = fake_launch
bf, f32 = torch.bfloat16, torch.float32
for cols, dt in ((8, bf), (6, bf), (7, bf), (8, f32)):
    g = torch.zeros(3, cols, dtype=dt)
    S.swiglu_forward(g, g, g)
    S.swiglu_backward(g, g, g, g, g)
g = torch.zeros(3, 8, dtype=bf)
S.swiglu_forward(g, g.float(), g)
print("PTX-DONE")
"""


@pytest.mark.slow
def test_every_swiglu_variant_compiles_to_ptx_with_wide_loads():
    """sm_90 PTX of the int64 / int32 word, float32 ILP and scalar variants (the registry cases build only
    some): the word kernels load 64- / 32-bit words, UNROLL of each tensor per iteration."""
    rows = run_ptx_script(_PTX_SCRIPT)
    loads = {(name, dt): (int(a), int(b), int(c)) for name, dt, a, b, c in rows}
    assert loads[("_fwd_wide_kernel", "int64")][0] >= 8  # 4 words of gate and up
    assert loads[("_bwd_wide_kernel", "int64")][0] >= 12
    assert loads[("_fwd_wide_kernel", "int32")][1] >= 8
    assert loads[("_bwd_wide_kernel", "int32")][1] >= 12
    assert ("_fwd_wide_kernel", "float32") in loads and ("_fwd_kernel", "int16") in loads
    assert ("_bwd_kernel", "int16") in loads
