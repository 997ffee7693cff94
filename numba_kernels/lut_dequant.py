"""Dequantization of 4-bit lookup-table codes in the arena's layout (QLoRA NF4 and NVFP4 weights of the plan).

The arena keeps one code per element after the executor unpacks it (one uint8 each, any order the plan's shape
has), with one scale per block of `block` consecutive elements (the format math of `runtime.reference.quant`):
    out[i] = table[codes[i]] * scale[i // block]
    NF4 with double quantization: scale[b] = (q[b] - 128) * s2[b // group] + offset    (q uint8, fp32 math)
The table is the format's 16 fp32 values (NF4 levels or E2M1). One grid-stride pass over the elements: codes read
once (1 byte), the output written once, scales from cache. Differs from `nf4.nf4_dequantize`, which reads
bitsandbytes' packing (two codes per byte, high nibble first) and its dynamic-map double quantization.
"""

from __future__ import annotations

import functools

import torch

from ._device import (
    check_contiguous,
    converters,
    get_cuda,
    grid_for,
    jit_kernel,
    launch,
    log2_block,
    threads,
    zeros1,
)

cuda = None  # numba.cuda, bound by the first kernel build (lazy import)

MAX_ELEMENTS = 2**31 - 1


def lut_dequantize_ref(codes: torch.Tensor, table: torch.Tensor, scale: torch.Tensor, block: int,
                       s2: torch.Tensor | None = None, offset: torch.Tensor | None = None,
                       group: int = 256) -> torch.Tensor:
    """fp32 values in codes' shape: table[codes] * per-block scale (scale from (q - 128) * s2 + offset if s2)."""
    n = codes.numel()
    if s2 is not None:
        q = scale.float() - 128.0
        scale = (q * s2.float().repeat_interleave(group)[: q.numel()]) + offset.float().reshape(())
    per_elem = scale.float().repeat_interleave(block)[:n]
    return (table.float()[codes.reshape(-1).long()] * per_elem).view(codes.shape)


@functools.cache
def _kernel(o_dt: torch.dtype, double: bool):
    global cuda
    cuda = get_cuda()
    from numba import float32

    _, so = converters(o_dt)

    @jit_kernel
    def kernel(codes, table, scale, s2, offset, log2_blk, log2_grp, out):
        n = codes.shape[0]
        for i in range(cuda.grid(1), n, cuda.gridsize(1)):
            b = i >> log2_blk  # power-of-two blocks: shifts (integer division is emulated on GPUs)
            if double:
                a = (float32(scale[b]) - float32(128.0)) * s2[b >> log2_grp]
                a = a + offset[0]
            else:
                a = scale[b]
            out[i] = so(table[codes[i]] * a)

    return kernel


def lut_dequantize(codes: torch.Tensor, table: torch.Tensor, scale: torch.Tensor, block: int, out: torch.Tensor,
                   s2: torch.Tensor | None = None, offset: torch.Tensor | None = None, group: int = 256) -> None:
    """out (fp32/bf16, codes' element count) <- table[codes] * per-block scale; no allocation, no host sync.

    block and group are powers of two (every block size the configuration allows). codes uint8 (one per element), table fp32 [16], scale fp32 [blocks] (or uint8 q [blocks] with s2 fp32
    [ceil(blocks / group)] and offset fp32 [1]: double quantization)."""
    for name, t in (("codes", codes), ("out", out), ("scale", scale)):
        check_contiguous(name, t)
    n = codes.numel()
    if out.numel() != n or n > MAX_ELEMENTS:
        raise ValueError(f"lut_dequantize: out has {out.numel()} elements for {n} codes (at most {MAX_ELEMENTS})")
    if codes.dtype != torch.uint8 or table.dtype != torch.float32:
        raise TypeError(f"lut_dequantize needs uint8 codes and an fp32 table, got {codes.dtype}, {table.dtype}")
    double = s2 is not None
    if double and offset is None:
        raise ValueError("double quantization needs s2 and offset")
    dummy = zeros1(codes.device)
    launch(_kernel(out.dtype, double), grid_for(n, threads()), threads(), codes.view(-1), table,
           scale.view(-1), s2.reshape(-1) if double else dummy, offset.reshape(-1) if double else dummy,
           log2_block("block", int(block)), log2_block("group", int(group)), out.view(-1))
