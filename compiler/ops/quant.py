"""Quantized storage formats: element dtype and the scale tensors each format needs for a tensor.

Used by the precision pass (QLoRA weight storage, fp8/fp4 matmul inputs) and mirrored by the
reference backend's quantizers (runtime/reference/quant.py).
- `nf4` (qlora_bnb): 4-bit NormalFloat codes, one absmax per `block` elements; with double quant the
  absmaxes are int8 (uint8 storage) with one fp32 scale per 256 of them plus one fp32 offset.
- `fp8_block` (qlora_fp8): fp8 e4m3 codes, one fp32 scale per `block` x `block` tile of the matrix.
- `fp4` (qlora_fp4, nvfp4 recipes): fp4 e2m1 codes, one fp8 e4m3 scale per 16 elements + one fp32 global scale.
- `fp4_block` (nvfp4 recipe matmul inputs): fp4 e2m1 codes, one fp8 e4m3 scale per 16 elements.
- `fp8_tensor` (fp8_hybrid matmul inputs): fp8 codes with one fp32 scale (delayed scaling, amax history).
- `fp4_quartet` (nvfp4_quartet matmul inputs): fp4 e2m1 codes of the input after a blockwise (32) Hadamard
  transform along its last (reduction) dim, one fp8 e4m3 scale per 16 elements, one fp32 global scale, and
  the clip ("trust") mask backward multiplies the gradient by: 1 bit per element, packed in uint8.
"""

from __future__ import annotations

import math

DOUBLE_QUANT_GROUP = 256
NVFP4_BLOCK = 16
QUARTET_HADAMARD = 32  # Hadamard block of the Quartet recipe (two NVFP4 micro-blocks, the paper's group size)


def data_dtype(fmt: str, backward: bool = False) -> str:
    return {"nf4": "nf4", "fp8_block": "fp8_e4m3", "fp4": "fp4_e2m1", "fp4_block": "fp4_e2m1",
            "fp4_quartet": "fp4_e2m1",
            "fp8_tensor": "fp8_e5m2" if backward else "fp8_e4m3"}[fmt]


def scale_tensors(fmt: str, shape: tuple[int, ...], block: int, double_quant: bool = False
                  ) -> list[tuple[str, tuple[int, ...], str]]:
    """(suffix, shape, dtype) of each scale tensor a `fmt`-quantized tensor of `shape` carries."""
    numel = math.prod(shape)
    if fmt == "nf4":
        blocks = -(-numel // block)
        if double_quant:
            return [("absmax", (blocks,), "uint8"), ("absmax2", (-(-blocks // DOUBLE_QUANT_GROUP) + 1,), "fp32")]
        return [("absmax", (blocks,), "fp32")]
    if fmt == "fp8_block":
        rows, cols = (shape[0], numel // shape[0]) if len(shape) > 1 else (1, numel)
        return [("scale", (-(-rows // block), -(-cols // block)), "fp32")]
    if fmt == "fp4":
        return [("scale", (-(-numel // NVFP4_BLOCK),), "fp8_e4m3"), ("global_scale", (1,), "fp32")]
    if fmt == "fp4_block":
        return [("scale", (-(-numel // NVFP4_BLOCK),), "fp8_e4m3")]
    if fmt == "fp8_tensor":
        return [("scale", (1,), "fp32")]
    if fmt == "fp4_quartet":
        return [("scale", (-(-numel // NVFP4_BLOCK),), "fp8_e4m3"), ("global_scale", (1,), "fp32"),
                ("mask", (-(-numel // 8),), "uint8")]
    raise ValueError(f"unknown quantization format {fmt!r}")
