"""Reference quantizers/dequantizers for the formats of `surogate.compiler.ops.quant` (CPU, torch).

Codes are stored unpacked (one code per uint8) in the reference backend: memory is the planner's
business, numerics are this module's. NF4 uses the bitsandbytes code table; double quant stores the
block absmaxes as int8 around their mean with one fp32 scale per 256 (+ the mean as the last entry).
"""

from __future__ import annotations

import torch

from surogate.compiler.ops.quant import DOUBLE_QUANT_GROUP, NVFP4_BLOCK

NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
])
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
FP8_MAX = 448.0


def _nearest(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    return (x[..., None] - code).abs().argmin(-1).to(torch.uint8)


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    flat = x.reshape(-1).float()
    pad = (-flat.numel()) % block
    return torch.cat([flat, flat.new_zeros(pad)]).view(-1, block)


def quantize(fmt: str, w: torch.Tensor, block: int, double_quant: bool = False,
             four_over_six: bool = False) -> list[torch.Tensor]:
    """[codes, *scales] of `w` in `fmt` (scales as the IR declares them). `four_over_six` (fp4): each
    16-value block is scaled so its largest magnitude maps to 6 or to 4, whichever reconstructs it with
    the smaller squared error (Four Over Six adaptive block scaling)."""
    if fmt == "nf4":
        b = _blocks(w, block)
        absmax = b.abs().amax(1).clamp(min=1e-12)
        codes = _nearest(b / absmax[:, None], NF4_CODE).reshape(-1)[: w.numel()].view(w.shape)
        if not double_quant:
            return [codes, absmax]
        offset = absmax.mean()
        g = _blocks(absmax - offset, DOUBLE_QUANT_GROUP)
        s2 = g.abs().amax(1).clamp(min=1e-12) / 127.0
        q8 = (torch.round(g / s2[:, None]).clamp(-127, 127) + 128).to(torch.uint8).reshape(-1)[: absmax.numel()]
        return [codes, q8, torch.cat([s2, offset[None]])]
    if fmt == "fp8_block":
        rows = w.shape[0]
        m = w.reshape(rows, -1).float()
        r, c = -(-rows // block), -(-m.shape[1] // block)
        scale = torch.empty(r, c)
        codes = torch.empty_like(m, dtype=torch.float8_e4m3fn)
        for i in range(r):
            for j in range(c):
                tile = m[i * block:(i + 1) * block, j * block:(j + 1) * block]
                scale[i, j] = tile.abs().amax().clamp(min=1e-12) / FP8_MAX
                codes[i * block:(i + 1) * block, j * block:(j + 1) * block] = (tile / scale[i, j]).to(torch.float8_e4m3fn)
        return [codes.view(w.shape), scale]
    if fmt in ("fp4", "fp4_block"):
        b = _blocks(w, NVFP4_BLOCK)
        gscale = (b.abs().amax().clamp(min=1e-12) / (FP8_MAX * 6.0)) if fmt == "fp4" else torch.tensor(1.0)
        scale, codes = _fp4_blocks(b, gscale, 6.0)
        if four_over_six:
            scale4, codes4 = _fp4_blocks(b, gscale, 4.0)
            better = _fp4_error(b, codes4, scale4, gscale) < _fp4_error(b, codes, scale, gscale)
            scale = torch.where(better, scale4.float(), scale.float()).to(torch.float8_e4m3fn)
            codes = torch.where(better[:, None], codes4, codes)
        codes = codes.reshape(-1)[: w.numel()].view(w.shape)
        return [codes, scale, gscale.reshape(1)] if fmt == "fp4" else [codes, scale]
    if fmt == "fp8_tensor":
        scale = w.abs().amax().float().clamp(min=1e-12) / FP8_MAX
        return [(w.float() / scale).to(torch.float8_e4m3fn), scale.reshape(1)]
    raise ValueError(f"unknown format {fmt!r}")


def _fp4_blocks(b: torch.Tensor, gscale: torch.Tensor, top: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 block scales, E2M1 codes [blocks, 16]) with each block's amax mapped to `top` (6 or 4)."""
    scale = (b.abs().amax(1) / top / gscale).to(torch.float8_e4m3fn)
    denom = (scale.float() * gscale).clamp(min=1e-30)
    return scale, _nearest(b / denom[:, None], E2M1)


def _fp4_error(b: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, gscale: torch.Tensor) -> torch.Tensor:
    """Squared reconstruction error per block."""
    return ((E2M1[codes.long()] * (scale.float() * gscale)[:, None] - b) ** 2).sum(1)


def dequantize(fmt: str, parts: list[torch.Tensor], shape: tuple[int, ...], block: int,
               double_quant: bool = False) -> torch.Tensor:
    """fp32 tensor of `shape` from `quantize`'s output."""
    numel = int(torch.Size(shape).numel())
    if fmt == "nf4":
        codes, absmax = parts[0], parts[1]
        if double_quant:
            s2, offset = parts[2][:-1], parts[2][-1]
            q = _blocks(absmax.float() - 128.0, DOUBLE_QUANT_GROUP)
            absmax = (q * s2[:, None]).reshape(-1)[: absmax.numel()] + offset
        vals = NF4_CODE[codes.long()].reshape(-1)
        pad = (-numel) % block
        vals = torch.cat([vals, vals.new_zeros(pad)]).view(-1, block) * absmax[:, None]
        return vals.reshape(-1)[:numel].view(shape)
    if fmt == "fp8_block":
        codes, scale = parts
        m = codes.float().reshape(shape[0], -1)
        s = scale.repeat_interleave(block, 0)[: m.shape[0]].repeat_interleave(block, 1)[:, : m.shape[1]]
        return (m * s).view(shape)
    if fmt in ("fp4", "fp4_block"):
        codes, scale = parts[0], parts[1]
        g = parts[2].float() if fmt == "fp4" else torch.tensor(1.0)
        vals = E2M1[codes.long()].reshape(-1)
        pad = (-numel) % NVFP4_BLOCK
        vals = torch.cat([vals, vals.new_zeros(pad)]).view(-1, NVFP4_BLOCK) * (scale.float() * g)[:, None]
        return vals.reshape(-1)[:numel].view(shape)
    if fmt == "fp8_tensor":
        return (parts[0].float() * parts[1].float()).view(shape)
    raise ValueError(f"unknown format {fmt!r}")
