"""Quartet (`recipe: nvfp4_quartet`) kernels of the CPU reference backend: quantize, qlinear_quartet and its
two backward GEMMs. The element math (Hadamard, NVFP4 quantizers, counter-based randomness) is
`surogate.numba_kernels.hadamard`'s torch reference, so the Numba kernels and this oracle agree bit for bit.

Forward: x and W are rotated by the same blockwise Hadamard H (fixed random signs from `sign_seed`) and
quantized to NVFP4; out = deq(Q(x H)) deq(Q(W H))^T = x W^T up to quantization error (H is orthogonal).
Backward (both GEMMs in the Hadamard basis of the forward): the two operands of each GEMM are rotated along
its reduction dim by a fresh random-sign Hadamard (seeded by (seed, step, GEMM), the same for both operands)
and quantized with stochastic rounding, so each GEMM is an unbiased estimate; the result is multiplied by
the clip mask of the forward operand it differentiates and rotated back by H^T.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from surogate.numba_kernels.hadamard import (
    HADAMARD,
    nvfp4_dequantize_ref,
    nvfp4_quantize_ref,
    random_signs_ref,
    rht_ref,
    seed_with_step,
    unpack_bits,
)

Tensors = list[torch.Tensor | None]
_M32 = 0xFFFFFFFF


def stream_seed(seed: int, step: int, stream: int, k: int) -> int:
    """64-bit seed of one random stream: (projection seed, step, GEMM 0 = dx / 1 = dW, k: 0 signs, 1/2 operands).
    Equal to `seed_with_step(stream_seed(seed, 0, stream, k), step)`: what the Numba kernels compute when the
    step comes as a device tensor."""
    return seed_with_step(((int(seed) & _M32) << 32) | (int(stream) * 4 + int(k)), step)


def quartet_quantize(x: Tensors, a: dict, ctx: Any) -> Tensors:
    """[codes (Hadamard basis), e4m3 block scales, fp32 global scale, packed clip mask] of a matmul input."""
    q, src = a["quartet"], x[0]
    rows = src.reshape(-1, src.shape[-1])
    codes, bits, gs, mask = nvfp4_quantize_ref(rht_ref(rows, random_signs_ref(q["sign_seed"])), q["forward"])
    return [codes.view(src.shape), bits.view(torch.float8_e4m3fn), gs, mask]


def _deq(codes: torch.Tensor, scale: torch.Tensor, gscale: torch.Tensor) -> torch.Tensor:
    """[rows, last dim] fp32 of a quantized input (still in the Hadamard basis)."""
    return nvfp4_dequantize_ref(codes, scale.view(torch.uint8), gscale).reshape(-1, codes.shape[-1])


def qlinear_quartet(x: Tensors, a: dict, ctx: Any) -> Tensors:
    inp, w, xq, xs, xg, _, wq, ws, wg = x[:9]
    y = _deq(xq, xs, xg) @ _deq(wq, ws, wg).t()
    if len(x) > 10 and x[10] is not None:
        y = y + x[10].float()
    return [y.view(*inp.shape[:-1], w.shape[0])]


def _sr(x: torch.Tensor, seed: int) -> torch.Tensor:
    codes, bits, gs, _ = nvfp4_quantize_ref(x, "sr", seed)
    return nvfp4_dequantize_ref(codes, bits, gs)


def sr_gemm(a: torch.Tensor, b: torch.Tensor, seed: int, step: int, stream: int) -> torch.Tensor:
    """a [P, R] @ b[Q, R]^T estimated as SR(a S H) SR(b S H)^T, S random signs, H the blockwise Hadamard along
    R (zero-padded to a multiple of 32: padding adds nothing to the products); unbiased given S."""
    pad = (-a.shape[1]) % HADAMARD
    if pad:
        a, b = F.pad(a, (0, pad)), F.pad(b, (0, pad))
    signs = random_signs_ref(stream_seed(seed, step, stream, 0))
    return _sr(rht_ref(a, signs), stream_seed(seed, step, stream, 1)) @ \
        _sr(rht_ref(b, signs), stream_seed(seed, step, stream, 2)).t()


def _unrotate(g_h: torch.Tensor, mask: torch.Tensor, q: dict) -> torch.Tensor:
    """Trust mask, then back from the forward Hadamard basis (H^T)."""
    keep = unpack_bits(mask, g_h.numel()).view(g_h.shape)
    return rht_ref(g_h * keep, random_signs_ref(q["sign_seed"]), inverse=True)


def qlinear_quartet_bwd_data(x: Tensors, a: dict, ctx: Any) -> Tensors:
    dy, wq, ws, wg, xmask = x
    q = a["quartet"]
    rows = dy.reshape(-1, dy.shape[-1]).float()
    w_h = _deq(wq, ws, wg)  # [N, K]
    dx_h = sr_gemm(rows, w_h.t().contiguous(), q["seed"], ctx.step, a.get("stream", 0))
    return [_unrotate(dx_h, xmask, q).view(*dy.shape[:-1], w_h.shape[1])]


def qlinear_quartet_bwd_weight(x: Tensors, a: dict, ctx: Any) -> Tensors:
    dy, xq, xs, xg, wmask = x
    q = a["quartet"]
    rows = dy.reshape(-1, dy.shape[-1]).float()
    x_h = _deq(xq, xs, xg)  # [M, K]
    dw_h = sr_gemm(rows.t().contiguous(), x_h.t().contiguous(), q["seed"], ctx.step, a.get("stream", 1))
    outs: Tensors = [_unrotate(dw_h, wmask, q)]
    if a.get("has_bias"):
        outs.append(rows.sum(0))
    return outs


KERNELS = {"qlinear_quartet": qlinear_quartet, "qlinear_quartet_bwd_data": qlinear_quartet_bwd_data,
           "qlinear_quartet_bwd_weight": qlinear_quartet_bwd_weight}
