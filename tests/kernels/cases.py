"""Small argument sets for every registry kernel, shared by the registry test, ptx_check.py and cache_check.py.

`CASES[name](dtype)` returns (args, kwargs, atol) with fresh tensors; `dtype` is the activation/param
dtype (float32 or bfloat16). Outputs are among the args (caller-provided buffers).
"""

from __future__ import annotations

import torch

from surogate.numba_kernels.adamw8bit import adamw8bit_state, adamw_hparams
from surogate.numba_kernels.cross_entropy import CEWorkspace
from surogate.numba_kernels.nf4 import nf4_quantize_ref
from surogate.numba_kernels.quant8 import dynamic_map
from surogate.numba_kernels.rope import rope_tables_ref


def _g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _r(*shape, dtype=torch.float32, seed=0, scale=1.0):
    return (torch.randn(*shape, generator=_g(seed)) * scale).to(dtype)


def _inv_freq(d):
    return 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))


def rmsnorm_fwd(dt):
    x, res, w = _r(5, 24, dtype=dt), _r(5, 24, dtype=dt, seed=1), _r(24, dtype=dt, seed=2)
    return (x, w, torch.empty_like(x), torch.empty(5), 1e-6), {"residual": res, "sum_out": torch.empty_like(x)}, 0


def rmsnorm_rope_fwd(dt):
    # head_dim 128: the one-pass path (rope epilogue) in bf16 and fp32
    x, w = _r(3, 2, 128, dtype=dt), (torch.rand(128, generator=_g(5)) + 0.5).to(dt)
    cos, sin = rope_tables_ref(_inv_freq(128), 4)
    pos = torch.tensor([0, 3, 1], dtype=torch.int64)
    return (x, w, torch.empty_like(x), torch.empty(6), 1e-6, pos, cos, sin), {}, 1e-5


def rmsnorm_rope_bwd(dt):
    (x, w, _, _, eps, pos, cos, sin), _, _ = rmsnorm_rope_fwd(dt)
    dout = _r(3, 2, 128, dtype=dt, seed=6)
    return (dout, x, w, torch.empty_like(x), torch.empty_like(w), None, eps, pos, cos, sin), {}, 1e-4


def rmsnorm_bwd(dt):
    # rstd None: the kernel recomputes it, as the cuda backend calls it (a given rstd: tests/kernels/test_rmsnorm)
    s, w, dy = _r(5, 24, dtype=dt), _r(24, dtype=dt, seed=2), _r(5, 24, dtype=dt, seed=3)
    return ((dy, s, w, None, torch.empty_like(s), torch.empty_like(w)),
            {"dresidual": _r(5, 24, dtype=dt, seed=4), "eps": 1e-6}, 1e-5)


def swiglu_fwd(dt):
    return (_r(3, 20, dtype=dt), _r(3, 20, dtype=dt, seed=1), torch.empty(3, 20, dtype=dt)), {}, 1e-6


def swiglu_bwd(dt):
    g, u, d = _r(3, 20, dtype=dt), _r(3, 20, dtype=dt, seed=1), _r(3, 20, dtype=dt, seed=2)
    return (d, g, u, torch.empty_like(g), torch.empty_like(u)), {}, 1e-6


def _rope_args(dt):
    pos = torch.tensor([0, 1, 2, 0, 1], dtype=torch.int64)
    cos, sin = rope_tables_ref(_inv_freq(8), 8)
    return _r(5, 2, 8, dtype=dt), pos, cos, sin


def rope_fwd(dt):
    x, pos, cos, sin = _rope_args(dt)
    return (x, torch.empty_like(x), pos, cos, sin), {}, 1e-6


def rope_bwd(dt):
    return rope_fwd(dt)


def rope_fused_fwd(dt):
    x, pos, _, _ = _rope_args(dt)
    return (x, torch.empty_like(x), pos, _inv_freq(8), 1.0), {}, 1e-6


def rope_fused_bwd(dt):
    return rope_fused_fwd(dt)


def lora_dropout(dt):
    return (_r(40, dtype=dt), torch.empty(40, dtype=dt), 0.2, 1234, 5), {}, 0


def _ce(dt):
    x, w = _r(6, 8, dtype=dt), _r(20, 8, dtype=dt, seed=1)
    labels = torch.tensor([1, 19, -100, 0, 7, 7])
    return x, w, labels, CEWorkspace.allocate(6, 20, dt, "cpu", chunks=2, vocab_tile=12)


def lmhead_ce_fwd(dt):
    x, w, labels, ws = _ce(dt)
    return (x, w, labels, torch.empty(6), torch.empty(6), ws), {}, 1e-5


def lmhead_ce_bwd(dt):
    x, w, labels, ws = _ce(dt)
    lse = torch.logsumexp((x @ w.t()).float(), dim=-1)
    return (x, w, labels, lse, 0.25, torch.empty_like(x), torch.zeros_like(w), ws), {}, 1e-5


def lmhead_ce_fwd_bwd(dt):
    x, w, labels, _ = _ce(dt)
    ws = CEWorkspace.allocate(6, 20, dt, "cpu", chunks=2)  # one vocab tile: the fused row kernel
    return (x, w, labels, 0.25, torch.empty(6), torch.empty(6), torch.empty_like(x), torch.zeros_like(w), ws), {}, 1e-5


def quantize_blockwise8(dt):
    return (_r(70, dtype=dt), dynamic_map(True), torch.empty(70, dtype=torch.uint8), torch.empty(3), 32), {}, 0


def dequantize_blockwise8(dt):
    codes = torch.randint(0, 256, (70,), generator=_g(), dtype=torch.uint8)
    return (codes, torch.rand(3, generator=_g()), dynamic_map(False), torch.empty(70, dtype=dt), 32), {}, 0


def nf4_quantize(dt):
    return (_r(70, dtype=dt), torch.empty(35, dtype=torch.uint8), torch.empty(3), 32), {}, 0


def nf4_double_quant(dt):
    a = torch.rand(300, generator=_g()) + 0.5
    return (a, torch.empty(300, dtype=torch.uint8), torch.empty(2), torch.empty(1)), {}, 0


def nf4_dequantize(dt):
    q = nf4_quantize_ref(_r(70), 32)
    return (q.packed, torch.empty(70, dtype=dt), 32), {"absmax": q.absmax}, 0


def lut_dequantize(dt):
    """NF4 codes of 203 elements (odd, a partial last block of 8), double-quantized scales: 26 blocks, groups of 4."""
    from surogate.runtime.reference.quant import NF4_CODE

    g = _g(5)
    codes = torch.randint(0, 16, (7, 29), generator=g, dtype=torch.uint8)
    q = torch.randint(0, 256, (26,), generator=g, dtype=torch.uint8)
    s2, offset = torch.rand(7, generator=g) * 0.01, torch.tensor([0.3])
    return (codes, NF4_CODE.float(), q, 8, torch.empty(7, 29, dtype=dt)), {"s2": s2, "offset": offset, "group": 4}, 0


def fp8_amax(dt):
    return (_r(50, dtype=dt), torch.empty(1)), {}, 0


def fp8_quantize(dt):
    return (_r(50, dtype=dt, scale=30), torch.empty(50, dtype=torch.uint8), torch.tensor([2.0]), "e4m3"), {}, 0


def fp8_delayed_scale(dt):
    hist = torch.rand(9, generator=_g()) * 4
    return (torch.tensor([2.5]), hist, torch.empty(1), (0, 8), 1e-12, 448.0, True), {}, 0


def fp8_dequantize(dt):
    codes = torch.randint(0, 256, (50,), generator=_g(), dtype=torch.uint8)
    codes[codes == 0x7F] = 0  # skip NaN codes: NaN != NaN in comparisons
    codes[codes == 0xFF] = 0
    return (codes, torch.tensor([0.5]), torch.empty(50, dtype=dt), "e4m3"), {}, 0


def fp8_quantize_blocks(dt):
    return (_r(9, 10, dtype=dt, scale=5), torch.empty(9, 10, dtype=torch.uint8), torch.empty(3, 2), (4, 8), "e5m2"), {}, 0


def fp8_dequantize_blocks(dt):
    codes = torch.randint(0, 0x7B, (9, 10), generator=_g(), dtype=torch.uint8)
    return (codes, torch.rand(3, 2, generator=_g()), torch.empty(9, 10, dtype=dt), (4, 8), "e5m2"), {}, 0


def adamw8bit_step(dt):
    n = 300
    st = adamw8bit_state(n)
    st["m_absmax"].fill_(0.01)
    st["v_absmax"].fill_(1e-4)
    st["m_codes"].copy_(torch.randint(0, 256, (n,), generator=_g(), dtype=torch.uint8))
    st["v_codes"].copy_(torch.randint(0, 256, (n,), generator=_g(1), dtype=torch.uint8))
    hp = adamw_hparams(1e-3, 0.9, 0.999, 1e-8, 0.1, 3)
    master = _r(n) if dt == torch.bfloat16 else None
    param = master.to(dt) if master is not None else _r(n)
    return (param, _r(n, dtype=dt, seed=5, scale=0.01), st, hp), {"master": master}, 0


def normuon_momentum(dt):
    return (_r(30, dtype=dt), _r(30, seed=1), torch.empty(30, dtype=dt), 0.95), {"nesterov": True}, 1e-6


def normuon_normalise(dt):
    return (_r(4, 9), torch.rand(4, generator=_g()), torch.empty(4), torch.empty(1), 0.95), {}, 1e-5


def normuon_apply(dt):
    p = _r(4, 9, dtype=dt)
    return (p, _r(4, 9, seed=1), torch.rand(4, generator=_g()) + 0.1, torch.tensor([1.1]), torch.tensor([0.01, 0.1])), {
        "cautious": True, "grad": _r(4, 9, seed=2), "momentum": _r(4, 9, seed=3, dtype=dt)
    }, 1e-6


def hadamard_rht(dt):
    return (_r(3, 64, dtype=dt), torch.tensor([1.0, -1.0] * 16), torch.empty(3, 64)), {"inverse": False}, 0


def nvfp4_quartet_quantize(dt):
    x = _r(3, 32, dtype=dt, scale=5.0)
    return (x, torch.empty(3, 32, dtype=torch.uint8), torch.empty(6, dtype=torch.uint8), torch.empty(1),
            torch.empty(12, dtype=torch.uint8), "sr"), {"seed": 11, "step": torch.tensor([5])}, 0


def quartet_signs(dt):
    return (torch.empty(32), (3 << 32) | 4), {"step": torch.tensor([2])}, 0


def lora_merge(dt):
    """dt is the model dtype; the adapters are fp32 (the default lora_dtype) under a bf16 model."""
    base, h, b = _r(5, 40, dtype=dt), _r(5, 4, seed=1), _r(40, 4, seed=2)
    return (base, h, b, torch.empty_like(base), 2.0), {}, 1e-5 if dt == torch.float32 else 1e-2


def lora_fold_tail(dt):
    """tail: the last 12 columns (3 slots of rank 4) of a [40, 20] weight, rows strided; B in slot 1."""
    w = _r(40, 20, dtype=dt, seed=5)
    return (_r(40, 4, dtype=dt, seed=6), w[:, 8:], 0.75, 1), {}, 0


def split3_bf16(dt):
    """dt unused (fp32 in, bf16 parts out); f a transposed view with an inf and a value past bf16's range (NaN:
    tests/kernels/test_split_bf16.py)."""
    f = _r(6, 5, scale=3.0).t()
    f[0, 0], f[2, 2] = float("inf"), 3.4e38
    parts = torch.empty(3, 5, 6, dtype=torch.bfloat16)
    return (f, parts[0], parts[1], parts[2]), {}, 0


def sum3_f32(dt):
    """out in dt; the three fp32 slices are column blocks of one product (strided), accumulate with alpha."""
    prod = _r(4, 21, seed=3)
    return (_r(4, 7, dtype=dt, seed=4), prod[:, :7], prod[:, 7:14], prod[:, 14:]), \
        {"accumulate": True, "alpha": 2.5}, 1e-6 if dt == torch.float32 else 1e-2


def _cases() -> dict:
    from surogate.numba_kernels import KERNELS

    return {name: globals()[name] for name in KERNELS if name in globals()}


CASES = _cases()


# numba_kernels modules whose launchers call `launch` (replaced by `launch_every_case`)
LAUNCHING_MODULES = ("rmsnorm", "swiglu", "rope", "dropout", "cross_entropy", "quant8", "nf4", "fp8", "adamw8bit",
                     "normuon", "hadamard_cuda", "lut_dequant", "lora_merge", "split_bf16")


def launch_every_case(fake_launch) -> None:
    """Run every registry kernel's cuda launcher on its case, in both dtypes, with `launch` replaced by
    `fake_launch(kernel, grid, block, *args)`: every kernel variant is built, nothing runs on a device."""
    import importlib

    from surogate.numba_kernels import KERNELS, _device

    _device._max_resident_blocks = lambda: 1056  # an H100's resident blocks: grids as on the real target
    for mod in LAUNCHING_MODULES:
        importlib.import_module(f"surogate.numba_kernels.{mod}").launch = fake_launch
    for name in sorted(KERNELS):
        for dt in (torch.float32, torch.bfloat16):
            args, kwargs, _ = CASES[name](dt)
            KERNELS[name].cuda(*args, **kwargs)


def kernel_name(kernel) -> str:
    """module.factory of a jit kernel built inside a factory function (its closure's name)."""
    return f"{kernel.py_func.__module__}.{kernel.py_func.__qualname__}".replace(".<locals>.kernel", "")
