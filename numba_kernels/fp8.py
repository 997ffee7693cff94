"""FP8 (E4M3 / E5M2) quantize and dequantize with per-tensor or per-block scales.

Math (the definition): codes = float8(clamp(x * scale, -max, max)) with round-to-nearest-even, i.e.
torch's `float8_e4m3fn` / `float8_e5m2` casts after saturation (NaN stays NaN); x ~= float(codes) * scale_inv.
    E4M3: bias 7, 3 mantissa bits, max 448, no inf, NaN = S.1111.111
    E5M2: bias 15, 2 mantissa bits, max 57344 (inf exists but saturation never produces it)
Per-tensor: scale = max / amax (amax from `fp8_amax`, or a delayed-scaling history), passed as a device
scalar so the launch can sit in a CUDA graph. Per-block: 2-D tiles [block_rows, block_cols] of a 2-D
tensor, each with its own scale = max / amax(tile) (1 for an all-zero tile); scale_inv [tiles_r, tiles_c]
fp32 is stored (tile sides are powers of two, as qlora_block_size is). Codes are uint8 (view them as torch.float8_* to use them in torch).
The kernels encode by integer rounding of the fp32 bit pattern, bit for bit equal to torch's casts.
"""

from __future__ import annotations

import functools
import math

import torch

from ._device import (
    check_contiguous,
    converters,
    get_cuda,
    grid_for,
    helpers,
    jit_kernel,
    launch,
    log2_block,
    threads,
)

cuda = None  # numba.cuda, bound by the first kernel build (lazy import)

FORMATS = {
    "e4m3": (torch.float8_e4m3fn, 448.0),
    "e5m2": (torch.float8_e5m2, 57344.0),
}


def _fmt(fmt: str) -> tuple[torch.dtype, float]:
    if fmt not in FORMATS:
        raise ValueError(f"unknown fp8 format {fmt!r}; expected one of {sorted(FORMATS)}")
    return FORMATS[fmt]


# ---------------------------------------------------------------- reference


def fp8_quantize_ref(x: torch.Tensor, scale: torch.Tensor | float, fmt: str = "e4m3",
                     divide: bool = False) -> torch.Tensor:
    """uint8 codes of clamp(x * scale) (or clamp(x / scale) with `divide`: a dequantization scale, as the fp8
    recipe keeps it) cast to the fp8 format (scale broadcastable to x, fp32)."""
    dt, mx = _fmt(fmt)
    s = torch.as_tensor(scale, dtype=torch.float32)
    v = x.float() / s if divide else x.float() * s
    return torch.clamp(v, -mx, mx).to(dt).view(torch.uint8)


def fp8_delayed_scale_ref(amax: torch.Tensor, hist: torch.Tensor, scale: torch.Tensor, window: tuple[int, int],
                          floor: float, fmax: float, push: bool) -> None:
    """scale[0] = max(amax[0], hist[lo:hi].max(), floor) / fmax: the dequantization scale of delayed scaling (an
    empty window: just-in-time scaling); with `push`, amax[0] enters hist at slot 0 (newest first), read before."""
    lo, hi = window
    m = amax.float().reshape(1)
    if hi > lo:
        m = torch.maximum(m, hist[lo:hi].max().reshape(1))
    scale.copy_(m.clamp(min=floor) / fmax)
    if push:
        hist.copy_(torch.cat([amax.float().reshape(1), hist[:-1]]))


def fp8_dequantize_ref(
    codes: torch.Tensor, scale_inv: torch.Tensor | float, fmt: str = "e4m3", out_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    dt, _ = _fmt(fmt)
    return (codes.view(dt).float() * torch.as_tensor(scale_inv, dtype=torch.float32)).to(out_dtype)


def fp8_scale_from_amax(amax: torch.Tensor, fmt: str = "e4m3") -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, scale_inv) fp32 for an amax (1 where amax is 0 or not finite)."""
    _, mx = _fmt(fmt)
    a = amax.float()
    ok = (a > 0) & torch.isfinite(a)
    scale = torch.where(ok, torch.tensor(mx, dtype=torch.float32) / torch.where(ok, a, torch.ones_like(a)), 1.0)
    return scale, 1.0 / scale


def fp8_quantize_blocks_ref(
    x: torch.Tensor, block: tuple[int, int], fmt: str = "e4m3"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes uint8 like x, scale_inv fp32 [ceil(R/br), ceil(C/bc)]) with one scale per 2-D tile."""
    br, bc = block
    r, c = x.shape
    nr, nc = math.ceil(r / br), math.ceil(c / bc)
    pad = torch.zeros(nr * br, nc * bc, dtype=torch.float32)
    pad[:r, :c] = x.float().abs()
    amax = pad.view(nr, br, nc, bc).amax(dim=(1, 3))
    scale, scale_inv = fp8_scale_from_amax(amax, fmt)
    full = scale.repeat_interleave(br, 0).repeat_interleave(bc, 1)[:r, :c]
    return fp8_quantize_ref(x, full, fmt), scale_inv


def fp8_dequantize_blocks_ref(
    codes: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], fmt: str = "e4m3",
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    br, bc = block
    r, c = codes.shape
    full = scale_inv.repeat_interleave(br, 0).repeat_interleave(bc, 1)[:r, :c]
    return fp8_dequantize_ref(codes, full, fmt, out_dtype)


# ---------------------------------------------------------------- device codecs


@functools.cache
def _codec(fmt: str):
    """(encode(f32) -> int code, decode(int code) -> f32) device functions for one format."""
    global cuda  # a module global: the simulator swaps `cuda` in kernels' globals at launch
    cuda = get_cuda()
    from numba import float32, int64

    h = helpers()
    f32_bits, f32_from_bits, rint = h.f32_bits, h.f32_from_bits, h.rint
    if fmt == "e4m3":
        man, bias, max_bits, max_code, min_normal_bits, sub_mul, sub_step = 3, 7, 0x43E00000, 0x7E, 0x3C800000, 512.0, 2.0**-9
    else:
        man, bias, max_bits, max_code, min_normal_bits, sub_mul, sub_step = 2, 15, 0x47600000, 0x7B, 0x38800000, 65536.0, 2.0**-16
    shift = 23 - man
    half_m1 = (1 << (shift - 1)) - 1
    rebias = (127 - bias) << man
    emax = (1 << (7 - man)) - 1
    mmask = (1 << man) - 1
    is_e4m3 = fmt == "e4m3"  # a plain bool constant for the compiled code
    jit_dev = cuda.jit(device=True, inline="always")

    @jit_dev
    def encode(x):
        b = f32_bits(x)
        sign = (b >> int64(24)) & int64(0x80)
        ab = b & int64(0x7FFFFFFF)
        if ab > int64(0x7F800000):
            return sign | int64(0x7F)  # NaN
        if ab >= int64(max_bits):
            return sign | int64(max_code)  # saturate
        if ab < int64(min_normal_bits):
            q = rint(f32_from_bits(ab) * float32(sub_mul))  # subnormal: exact scaling, RNE to the grid
            return sign | int64(q)
        r = (ab + int64(half_m1) + ((ab >> int64(shift)) & int64(1))) >> int64(shift)
        return sign | (r - int64(rebias))

    @jit_dev
    def decode(code):
        c = int64(code)
        e = (c >> int64(man)) & int64(emax)
        m = c & int64(mmask)
        if e == int64(0):
            v = float32(m) * float32(sub_step)
        elif is_e4m3 and e == int64(emax) and m == int64(mmask):
            v = float32(math.nan)
        elif (not is_e4m3) and e == int64(emax):
            v = float32(math.inf) if m == int64(0) else float32(math.nan)
        else:
            v = f32_from_bits(((e + int64(127 - bias)) << int64(23)) | (m << int64(shift)))
        if c & int64(0x80):
            v = -v
        return v

    return encode, decode


# ---------------------------------------------------------------- kernels


@functools.cache
def _amax_kernel(x_dt: torch.dtype):
    global cuda
    cuda = get_cuda()
    from numba import float32

    lx, _ = converters(x_dt)
    block_max = helpers().block_max
    T = threads()

    @jit_kernel
    def kernel(x, amax):
        sm = cuda.shared.array(T, float32)
        m = float32(0.0)
        for i in range(cuda.grid(1), x.shape[0], cuda.gridsize(1)):
            m = max(m, abs(lx(x[i])))
        bm = block_max(sm, m)
        if cuda.threadIdx.x == 0:
            cuda.atomic.max(amax, 0, bm)

    return kernel


@functools.cache
def _quant_tensor_kernel(x_dt: torch.dtype, fmt: str, divide: bool = False):
    global cuda
    cuda = get_cuda()
    from numba import uint8

    lx, _ = converters(x_dt)
    encode, _ = _codec(fmt)

    if divide:  # (IEEE division, as torch's x / scale: codes bit for bit equal to the reference's)
        @jit_kernel
        def kernel(x, codes, scale):
            s = scale[0]
            for i in range(cuda.grid(1), x.shape[0], cuda.gridsize(1)):
                codes[i] = uint8(encode(lx(x[i]) / s))
    else:
        @jit_kernel
        def kernel(x, codes, scale):
            s = scale[0]
            for i in range(cuda.grid(1), x.shape[0], cuda.gridsize(1)):
                codes[i] = uint8(encode(lx(x[i]) * s))

    return kernel


@functools.cache
def _delayed_scale_kernel():
    global cuda
    cuda = get_cuda()
    from numba import float32

    @jit_kernel
    def kernel(amax, hist, scale, lo, hi, floor, fmax, push):
        if cuda.grid(1) != 0:  # a handful of values: one thread (what matters is that no host sync is needed)
            return
        m = amax[0]
        for i in range(lo, hi):
            m = max(m, hist[i])
        scale[0] = max(m, float32(floor)) / float32(fmax)
        if push:
            for i in range(hist.shape[0] - 1, 0, -1):
                hist[i] = hist[i - 1]
            hist[0] = amax[0]

    return kernel


@functools.cache
def _dequant_tensor_kernel(o_dt: torch.dtype, fmt: str):
    global cuda
    cuda = get_cuda()
    _, so = converters(o_dt)
    _, decode = _codec(fmt)

    @jit_kernel
    def kernel(codes, scale_inv, out):
        s = scale_inv[0]
        for i in range(cuda.grid(1), codes.shape[0], cuda.gridsize(1)):
            out[i] = so(decode(codes[i]) * s)

    return kernel


@functools.cache
def _quant_block_kernel(x_dt: torch.dtype, fmt: str):
    global cuda
    cuda = get_cuda()
    from numba import float32, uint8

    lx, _ = converters(x_dt)
    encode, _ = _codec(fmt)
    block_max = helpers().block_max
    fmax = FORMATS[fmt][1]
    T = threads()

    @jit_kernel
    def kernel(x, codes, scale_inv, br, sbc):
        sm = cuda.shared.array(T, float32)
        rows, cols = x.shape
        ntr, ntc = scale_inv.shape
        bc = 1 << sbc
        tid = cuda.threadIdx.x
        for tile in range(cuda.blockIdx.x, ntr * ntc, cuda.gridDim.x):  # a block per tile
            tr = tile // ntc
            tc = tile - tr * ntc
            r0, c0 = tr * br, tc * bc
            hr, hc = min(br, rows - r0), min(bc, cols - c0)
            m = float32(0.0)
            for k in range(tid, hr * bc, T):  # tile-local (row, col) by shift and mask
                rr, cc = k >> sbc, k & (bc - 1)
                if cc < hc:
                    m = max(m, abs(lx(x[r0 + rr, c0 + cc])))
            amax = block_max(sm, m)
            scale = float32(1.0)
            if amax > float32(0.0) and amax < float32(math.inf):
                scale = float32(fmax) / amax
            if tid == 0:
                scale_inv[tr, tc] = float32(1.0) / scale
            for k in range(tid, hr * bc, T):
                rr, cc = k >> sbc, k & (bc - 1)
                if cc < hc:
                    codes[r0 + rr, c0 + cc] = uint8(encode(lx(x[r0 + rr, c0 + cc]) * scale))

    return kernel


@functools.cache
def _dequant_block_kernel(o_dt: torch.dtype, fmt: str):
    global cuda
    cuda = get_cuda()
    _, so = converters(o_dt)
    _, decode = _codec(fmt)
    T = threads()

    @jit_kernel
    def kernel(codes, scale_inv, out, sbr, sbc):
        rows, cols = codes.shape
        for r in range(cuda.blockIdx.x, rows, cuda.gridDim.x):  # a block per row
            tr = r >> sbr
            for c in range(cuda.threadIdx.x, cols, T):
                out[r, c] = so(decode(codes[r, c]) * scale_inv[tr, c >> sbc])

    return kernel


# ---------------------------------------------------------------- launchers


def fp8_amax(x: torch.Tensor, amax: torch.Tensor) -> None:
    """amax[0] = max |x| (fp32 device scalar; zeroed here, then block maxima are combined atomically)."""
    check_contiguous("x", x)
    amax.zero_()
    flat = x.view(-1)
    launch(_amax_kernel(x.dtype), grid_for(flat.numel(), threads()), threads(), flat, amax)


def fp8_quantize(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, fmt: str = "e4m3",
                 divide: bool = False) -> None:
    """codes (uint8, like x) = fp8(clamp(x * scale[0])) (x / scale[0] with `divide`); `scale` is a one-element
    fp32 device tensor."""
    _fmt(fmt)
    check_contiguous("x", x)
    check_contiguous("codes", codes)
    n = x.numel()
    launch(_quant_tensor_kernel(x.dtype, fmt, bool(divide)), grid_for(n, threads()), threads(), x.view(-1),
           codes.view(-1), scale)


def fp8_delayed_scale(amax: torch.Tensor, hist: torch.Tensor, scale: torch.Tensor, window: tuple[int, int],
                      floor: float, fmax: float, push: bool) -> None:
    """See `fp8_delayed_scale_ref` (fp32 device tensors; one launch, no host synchronisation)."""
    lo, hi = int(window[0]), int(window[1])
    if not 0 <= lo <= hi <= hist.numel():
        raise ValueError(f"window {window} outside a history of {hist.numel()} values")
    launch(_delayed_scale_kernel(), 1, 1, amax, hist, scale, lo, hi, float(floor), float(fmax), bool(push))


def fp8_dequantize(codes: torch.Tensor, scale_inv: torch.Tensor, out: torch.Tensor, fmt: str = "e4m3") -> None:
    """out (fp32 or bf16) = float(codes) * scale_inv[0]."""
    _fmt(fmt)
    check_contiguous("codes", codes)
    check_contiguous("out", out)
    n = codes.numel()
    launch(
        _dequant_tensor_kernel(out.dtype, fmt), grid_for(n, threads()), threads(), codes.view(-1), scale_inv, out.view(-1)
    )


def fp8_quantize_blocks(
    x: torch.Tensor, codes: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], fmt: str = "e4m3"
) -> None:
    """Per-tile scales: x [R, C] -> codes [R, C] uint8 and scale_inv [ceil(R/br), ceil(C/bc)] fp32."""
    _fmt(fmt)
    br, bc = block
    if x.dim() != 2 or scale_inv.shape != (math.ceil(x.shape[0] / br), math.ceil(x.shape[1] / bc)):
        raise ValueError(f"x must be 2-D and scale_inv [{math.ceil(x.shape[0] / br)}, {math.ceil(x.shape[1] / bc)}]")
    sbc = log2_block("fp8 block columns", bc)
    tiles = scale_inv.numel()
    launch(_quant_block_kernel(x.dtype, fmt), grid_for(tiles, 1), threads(), x, codes, scale_inv, int(br), sbc)


def fp8_dequantize_blocks(
    codes: torch.Tensor, scale_inv: torch.Tensor, out: torch.Tensor, block: tuple[int, int], fmt: str = "e4m3"
) -> None:
    """out [R, C] (fp32 or bf16) = float(codes) * scale_inv of each element's tile."""
    _fmt(fmt)
    br, bc = block
    sbr, sbc = log2_block("fp8 block rows", br), log2_block("fp8 block columns", bc)
    launch(_dequant_block_kernel(out.dtype, fmt), grid_for(codes.shape[0], 1), threads(), codes, scale_inv, out, sbr, sbc)
