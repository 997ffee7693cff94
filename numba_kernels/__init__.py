"""Numba-CUDA kernels, each with a torch reference implementation (the definition of its math).

`KERNELS[name]` is a `KernelPair`: `.reference` runs on CPU (backend `cpu`, and the test oracle),
`.cuda` launches the Numba-CUDA kernel on torch's current stream (backend `cuda`; on CPU tensors when
NUMBA_ENABLE_CUDASIM=1). Both take the same arguments and write the same caller-provided buffers.
Importing this package does not import numba.cuda: the first CUDA launch does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from . import (
    adamw8bit,
    cpu,
    cross_entropy,
    dropout,
    fp8,
    hadamard,
    hadamard_cuda,
    lora_merge,
    lut_dequant,
    nf4,
    normuon,
    quant8,
    rmsnorm,
    rope,
    split_bf16,
    swiglu,
)


@dataclass(frozen=True)
class KernelPair:
    """The two implementations of one kernel, with identical signatures."""

    reference: Callable
    cuda: Callable

    def for_backend(self, backend: str) -> Callable:
        """`cpu` -> reference, `cuda` -> the Numba-CUDA launcher."""
        if backend == "cpu":
            return self.reference
        if backend == "cuda":
            return self.cuda
        raise ValueError(f"unknown kernel backend {backend!r}; expected 'cpu' or 'cuda'")


_CUDA = {
    "rmsnorm_fwd": rmsnorm.rmsnorm_forward,
    "rmsnorm_rope_fwd": rmsnorm.rmsnorm_rope_forward,
    "rmsnorm_rope_bwd": rmsnorm.rmsnorm_rope_backward,
    "rmsnorm_bwd": rmsnorm.rmsnorm_backward,
    "swiglu_fwd": swiglu.swiglu_forward,
    "swiglu_bwd": swiglu.swiglu_backward,
    "rope_fwd": rope.rope_forward,
    "rope_bwd": rope.rope_backward,
    "rope_fused_fwd": rope.rope_fused_forward,
    "rope_fused_bwd": rope.rope_fused_backward,
    "lora_dropout": dropout.dropout_apply,
    "lmhead_ce_fwd": cross_entropy.lmhead_ce_forward,
    "lmhead_ce_bwd": cross_entropy.lmhead_ce_backward,
    "lmhead_ce_fwd_bwd": cross_entropy.lmhead_ce_forward_backward,
    "quantize_blockwise8": quant8.quantize_blockwise,
    "dequantize_blockwise8": quant8.dequantize_blockwise,
    "nf4_quantize": nf4.nf4_quantize,
    "nf4_double_quant": nf4.nf4_double_quant,
    "nf4_dequantize": nf4.nf4_dequantize,
    "lut_dequantize": lut_dequant.lut_dequantize,
    "lora_merge": lora_merge.lora_merge,
    "lora_fold_tail": lora_merge.lora_fold_tail,
    "split3_bf16": split_bf16.split3,
    "sum3_f32": split_bf16.sum3,
    "fp8_amax": fp8.fp8_amax,
    "fp8_quantize": fp8.fp8_quantize,
    "fp8_delayed_scale": fp8.fp8_delayed_scale,
    "fp8_dequantize": fp8.fp8_dequantize,
    "fp8_quantize_blocks": fp8.fp8_quantize_blocks,
    "fp8_dequantize_blocks": fp8.fp8_dequantize_blocks,
    "adamw8bit_step": adamw8bit.adamw8bit_step,
    "normuon_momentum": normuon.normuon_momentum,
    "normuon_normalise": normuon.normuon_normalise,
    "normuon_apply": normuon.normuon_apply,
    "hadamard_rht": hadamard_cuda.hadamard_rht,
    "nvfp4_quartet_quantize": hadamard_cuda.nvfp4_quartet_quantize,
    "quartet_signs": hadamard_cuda.quartet_signs,
}

_CPU = {
    "rmsnorm_fwd": cpu.rmsnorm_forward,
    "rmsnorm_rope_fwd": cpu.rmsnorm_rope_forward,
    "rmsnorm_rope_bwd": cpu.rmsnorm_rope_backward,
    "rmsnorm_bwd": cpu.rmsnorm_backward,
    "swiglu_fwd": cpu.swiglu_forward,
    "swiglu_bwd": cpu.swiglu_backward,
    "rope_fwd": cpu.rope_forward,
    "rope_bwd": cpu.rope_backward,
    "rope_fused_fwd": cpu.rope_fused_forward,
    "rope_fused_bwd": cpu.rope_fused_backward,
    "lora_dropout": cpu.dropout_apply,
    "lmhead_ce_fwd": cpu.lmhead_ce_forward,
    "lmhead_ce_bwd": cpu.lmhead_ce_backward,
    "lmhead_ce_fwd_bwd": cpu.lmhead_ce_forward_backward,
    "quantize_blockwise8": cpu.quantize_blockwise,
    "dequantize_blockwise8": cpu.dequantize_blockwise,
    "nf4_quantize": cpu.nf4_quantize,
    "nf4_double_quant": cpu.nf4_double_quant,
    "nf4_dequantize": cpu.nf4_dequantize,
    "lut_dequantize": cpu.lut_dequantize,
    "lora_merge": lora_merge.lora_merge_ref,
    "lora_fold_tail": lora_merge.lora_fold_tail_ref,
    "split3_bf16": split_bf16.split3_ref,
    "sum3_f32": split_bf16.sum3_ref,
    "fp8_amax": cpu.fp8_amax,
    "fp8_quantize": cpu.fp8_quantize,
    "fp8_delayed_scale": cpu.fp8_delayed_scale,
    "fp8_dequantize": cpu.fp8_dequantize,
    "fp8_quantize_blocks": cpu.fp8_quantize_blocks,
    "fp8_dequantize_blocks": cpu.fp8_dequantize_blocks,
    "adamw8bit_step": cpu.adamw8bit_step,
    "normuon_momentum": cpu.normuon_momentum,
    "normuon_normalise": cpu.normuon_normalise,
    "normuon_apply": cpu.normuon_apply,
    "hadamard_rht": hadamard.hadamard_rht_cpu,
    "nvfp4_quartet_quantize": hadamard.nvfp4_quartet_quantize_cpu,
    "quartet_signs": hadamard.quartet_signs_cpu,
}

KERNELS: dict[str, KernelPair] = {name: KernelPair(reference=_CPU[name], cuda=_CUDA[name]) for name in _CUDA}

__all__ = ["KERNELS", "KernelPair"]
