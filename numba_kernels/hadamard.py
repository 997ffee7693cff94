"""Quartet (`recipe: nvfp4_quartet`): blockwise randomized Hadamard transform and NVFP4 quantization with
QuEST (forward) or stochastic-rounding (backward) scaling. Torch references here define the math; the
Numba-CUDA launchers are in `hadamard_cuda`.

Math (the definition):
- RHT: rows of x [R, K] (K a multiple of 32) in groups of 32: y_g = H32 (s * x_g), H32 the normalised
  Sylvester Hadamard matrix (orthogonal and symmetric), s a +-1 sign vector. Computed as five fp32
  butterfly stages (a + b, a - b) and one multiply by 32^-1/2, in that order, so the kernel matches bit for
  bit. The inverse is s * (H32 y_g).
- NVFP4 codes: E2M1 magnitudes {0, .5, 1, 1.5, 2, 3, 4, 6} (code = magnitude index, + 8 when negative and
  non-zero), one E4M3 scale per 16 consecutive elements, one fp32 global scale per tensor:
  value = E2M1[code] * e4m3(scale) * global.
- `quest` (forward, Quartet = QuEST after the Hadamard): block scale = QUEST_ALPHA * RMS(block), so the
  clipping point 6 * scale = 2.9225 RMS is the MSE-optimal clip of a Gaussian on the E2M1 grid; global =
  QUEST_ALPHA * amax / 448 (no block scale overflows E4M3). Round to nearest (ties to the smaller
  magnitude), clip to +-6; the trust mask bit is 1 where |x / scale| <= 6 (not clipped), packed 8 per
  byte, LSB first. Backward multiplies the gradient by it (QuEST's trust estimator).
- `sr` (backward): block scale = amax(block) / 6 rounded *up* to E4M3 (nothing clips), global = amax / 2688;
  each element rounds to one of its two grid neighbours with probability proportional to proximity
  (unbiased). The uniform u of element i is (hash(seed, i) >> 8) * 2^-24, the counter hash of
  `dropout.dropout_hash_ref`: a pure function of (seed, i), so kernel and reference agree bit for bit.
"""

from __future__ import annotations

import math

import torch

from .dropout import dropout_hash_ref

HADAMARD = 32
BLOCK = 16
E4M3_MAX = 448.0
STEP_STRIDE = 8  # low-word seed increment per step (room for 8 streams per step and seed)
_M32 = 0xFFFFFFFF
QUEST_ALPHA = 2.92247856 / 6.0  # QuEST's MSE-optimal Gaussian clip (in RMS units) over the largest E2M1 value
E2M1_MAGS = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
MODES = ("quest", "sr")
_MIDS = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
_INV_SQRT = float(torch.tensor(HADAMARD ** -0.5, dtype=torch.float32))


def hadamard_matrix(n: int = HADAMARD) -> torch.Tensor:
    """Normalised Sylvester Hadamard matrix [n, n] (fp32): orthogonal and symmetric."""
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def seed_with_step(seed: int, step: int) -> int:
    """The seed a kernel given `seed` and a device step tensor uses: step * STEP_STRIDE added to the low 32 bits
    (mod 2^32; the high word is untouched), so per-step streams of different seeds never collide."""
    return (int(seed) & ~_M32 & ((1 << 64) - 1)) | ((int(seed) + STEP_STRIDE * int(step)) & _M32)


def uniform_ref(seed: int, n: int, offset: int = 0) -> torch.Tensor:
    """n uniforms in [0, 1) (fp32, 24 bits) from the counter hash of (seed, offset + i)."""
    return (dropout_hash_ref(seed, offset, n) >> 8).to(torch.float32) * (2.0**-24)


def random_signs_ref(seed: int, n: int = HADAMARD) -> torch.Tensor:
    """+-1 (fp32) from the low bit of the counter hash."""
    return 1.0 - 2.0 * (dropout_hash_ref(seed, 0, n) & 1).to(torch.float32)


def _fwht(g: torch.Tensor) -> torch.Tensor:
    """Unnormalised Walsh-Hadamard transform of the last dim (32) in butterfly order."""
    h = 1
    while h < HADAMARD:
        v = g.unflatten(-1, (-1, 2, h))
        a, b = v[..., 0, :], v[..., 1, :]
        g = torch.stack([a + b, a - b], -2).flatten(-3)
        h *= 2
    return g


def rht_ref(x: torch.Tensor, signs: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """fp32 [R, K]: each group of 32 of each row rotated by H32 diag(signs) (or its inverse)."""
    if x.shape[-1] % HADAMARD:
        raise ValueError(f"Hadamard transform needs a last dimension divisible by {HADAMARD}, got {x.shape[-1]}")
    g = x.float().unflatten(-1, (-1, HADAMARD))
    s = signs.float().to(g.device)
    if not inverse:
        g = g * s
    g = _fwht(g) * torch.tensor(_INV_SQRT, dtype=torch.float32, device=g.device)
    if inverse:
        g = g * s
    return g.flatten(-2)


def _e4m3_round_up(v: torch.Tensor) -> torch.Tensor:
    """Smallest E4M3 value >= v (v in [0, 448]), as uint8 bits."""
    bits = v.to(torch.float8_e4m3fn).view(torch.uint8).clone()
    low = (bits.view(torch.float8_e4m3fn).float() < v) & (bits < 0x7E)
    return torch.where(low, bits + 1, bits)


def _codes_rtn(y: torch.Tensor) -> torch.Tensor:
    mag = torch.bucketize(y.abs(), _MIDS.to(y.device))  # midpoints strictly below |y|: ties go down
    return _signed(mag, y)


def _signed(mag: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.where((y < 0) & (mag > 0), mag + 8, mag).to(torch.uint8)


def _codes_sr(y: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    a = y.abs()
    grid = E2M1_MAGS.to(y.device)
    lo = (torch.bucketize(a, grid, right=True) - 1).clamp(0, 6)  # largest magnitude <= a
    glo, ghi = grid[lo], grid[lo + 1]
    p = (a - glo) / (ghi - glo)
    return _signed(lo + (u < p).long(), y)


def pack_bits(m: torch.Tensor) -> torch.Tensor:
    """bool [n] -> uint8 [ceil(n / 8)], element 8b + j in bit j of byte b."""
    flat = m.reshape(-1).to(torch.uint8)
    flat = torch.cat([flat, flat.new_zeros((-flat.numel()) % 8)]).view(-1, 8)
    weights = (2 ** torch.arange(8, device=flat.device)).to(torch.uint8)
    return (flat * weights).sum(1, dtype=torch.uint8)


def unpack_bits(b: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 [ceil(n / 8)] -> bool [n] (inverse of `pack_bits`)."""
    bits = (b.reshape(-1, 1).to(torch.int32) >> torch.arange(8, device=b.device)) & 1
    return bits.reshape(-1)[:n].bool()


def nvfp4_quantize_ref(x: torch.Tensor, mode: str, seed: int = 0
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes uint8 like x, scales uint8 (E4M3 bits) [n/16], global fp32 [1], mask uint8 [ceil(n/8)]).

    `mode`: "quest" (round to nearest, RMS scale, trust mask) or "sr" (stochastic rounding with uniforms
    from `seed`, block amax to 6 with the scale rounded up; the mask is all ones)."""
    if mode not in MODES:
        raise ValueError(f"unknown NVFP4 quantization mode {mode!r}; expected one of {', '.join(MODES)}")
    n = x.numel()
    if n % BLOCK:
        raise ValueError(f"NVFP4 quantization needs a multiple of {BLOCK} elements, got {n}")
    b = x.reshape(-1, BLOCK).float()
    amax = b.abs().amax() if n else torch.zeros(())
    if mode == "quest":
        ss = torch.zeros(b.shape[0], device=b.device)
        for j in range(BLOCK):  # sequential sum of squares: the kernel's order, bit for bit
            ss = ss + b[:, j] * b[:, j]
        raw = torch.tensor(QUEST_ALPHA, dtype=torch.float32) * torch.sqrt(ss / BLOCK)
        gs = torch.tensor(QUEST_ALPHA, dtype=torch.float32) * amax / E4M3_MAX
    else:
        raw = b.abs().amax(1) / 6.0
        gs = amax / (6.0 * E4M3_MAX)
    gs = torch.where(gs > 0, gs, torch.ones_like(gs))
    v = (raw / gs).clamp(max=E4M3_MAX)
    bits = _e4m3_round_up(v) if mode == "sr" else v.to(torch.float8_e4m3fn).view(torch.uint8)
    sf = bits.view(torch.float8_e4m3fn).float() * gs
    y = torch.where(sf[:, None] > 0, b / torch.where(sf > 0, sf, 1.0)[:, None], 0.0)
    if mode == "quest":
        mask = y.abs() <= 6.0
        codes = _codes_rtn(y.clamp(-6.0, 6.0))
    else:
        mask = torch.ones_like(y, dtype=torch.bool)
        codes = _codes_sr(y.clamp(-6.0, 6.0), uniform_ref(seed, n).to(y.device).view_as(y))
    return codes.view(x.shape), bits, gs.reshape(1), pack_bits(mask)


def nvfp4_dequantize_ref(codes: torch.Tensor, scales: torch.Tensor, gscale: torch.Tensor) -> torch.Tensor:
    """fp32 like codes: E2M1[code] * e4m3(scale of its block) * global."""
    mags = E2M1_MAGS.to(codes.device)
    c = codes.reshape(-1, BLOCK).long()
    val = torch.where(c >= 8, -mags[c & 7], mags[c & 7])
    sf = scales.view(torch.float8_e4m3fn).float() * gscale.float().reshape(())
    return (val * sf[:, None]).view(codes.shape)


# ---------------------------------------------------------------- backend `cpu` (the launchers' signatures)


def hadamard_rht_cpu(x: torch.Tensor, signs: torch.Tensor, out: torch.Tensor, inverse: bool = False) -> None:
    out.copy_(rht_ref(x, signs, inverse).view(out.shape))


def nvfp4_quartet_quantize_cpu(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, gscale: torch.Tensor,
                               mask: torch.Tensor, mode: str, seed: int = 0, step: torch.Tensor | None = None) -> None:
    seed = seed_with_step(seed, int(step[0]) if step is not None else 0)
    for buf, val in zip((codes, scales, gscale, mask), nvfp4_quantize_ref(x, mode, seed), strict=True):
        buf.copy_(val.view(buf.shape))


def quartet_signs_cpu(out: torch.Tensor, seed: int, step: torch.Tensor | None = None) -> None:
    out.copy_(random_signs_ref(seed_with_step(seed, int(step[0]) if step is not None else 0), out.numel()))
