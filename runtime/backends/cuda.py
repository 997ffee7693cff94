"""The `cuda` backend: the executor's kernel table for a GPU (and, under NUMBA_ENABLE_CUDASIM=1, for CPU
tensors, which is how it is tested without one).

- GEMMs: torch (cuBLAS) with `out=` the planned view (`cuda_gemm`);
- attention: torch's fused attention ops, varlen flash where available (`cuda_attention`);
- RMSNorm (also with the residual add fused: `add_rmsnorm`; a q/k norm with its rotation: `rmsnorm_rope`), RoPE,
  SwiGLU, dropout, NF4 dequant: Numba-CUDA kernels (`cuda_numba`);
- the fused LM-head cross-entropy (also with its backward: `lm_head_ce_fwd_bwd`): torch GEMMs on logits chunks
  and Numba-CUDA kernels (`cuda_ce`);
- the fused LoRA merge (`lora_merge`): a Numba-CUDA kernel (`cuda_lora`);
- 8-bit AdamW, NorMuon, gradient norm / clipping, copies and collectives (`cuda_optim`);
- FP8 quantize and matmuls (recipe fp8_hybrid): Numba quantize kernels and FP8 tensor-core GEMMs through
  torch._scaled_mm (`cuda_fp8`; the reference math where `cuda_fp8` says it cannot);
- MoE and FP4 matmul kinds: the reference math, run on the device (torch ops; see `_on_device`).

Every kernel writes into the planned arena views and returns them (see `cuda_state`). `make_kernel_table()`
returns a fresh table with its own caches: one per executor.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from surogate.runtime.backends import (
    cuda_attention,
    cuda_ce,
    cuda_fp8,
    cuda_gemm,
    cuda_lora,
    cuda_numba,
    cuda_optim,
)
from surogate.runtime.backends.cuda_state import CudaKernels, CudaState
from surogate.runtime.distributed import sequence
from surogate.runtime.reference.kernels_moe import KERNELS as MOE
from surogate.runtime.reference.kernels_quant import KERNELS as QUANT

OWN = {**cuda_gemm.KERNELS, **cuda_lora.KERNELS, **cuda_numba.KERNELS, **cuda_ce.KERNELS, **cuda_attention.KERNELS,
       **cuda_optim.KERNELS, **cuda_fp8.KERNELS}


def _on_device(fn: Callable) -> Callable:
    """A reference kernel run with its factory functions defaulting to the inputs' device."""

    @functools.wraps(fn)
    def run(ins: list, attrs: dict, ctx: Any) -> list:
        dev = next((t.device for t in ins if isinstance(t, torch.Tensor)), torch.device("cpu"))
        with torch.device(dev):
            return fn(ins, attrs, ctx)

    return run


def make_kernel_table() -> CudaKernels:
    """A new `cuda` kernel table (op kind -> kernel) with its own scratch and per-step scalar caches."""
    state = CudaState()
    table: dict[str, Callable] = {k: _on_device(f) for k, f in {**MOE, **QUANT}.items() if k not in OWN}
    table.update({k: functools.partial(f, state) for k, f in OWN.items()})
    table.update(sequence.KERNELS)  # all-to-alls through torch.distributed (NCCL), on the inputs' device
    return CudaKernels(table, state)


def fallback_kinds() -> list[str]:
    """Op kinds this backend always runs through the reference math instead of a dedicated kernel."""
    return sorted(k for k in {**MOE, **QUANT} if k not in OWN)


def reference_kinds(ops: Any, tensors: dict, device: torch.device) -> list[str]:
    """Kinds of `ops` (plan ops) that run the reference math on `device`: the fallback kinds, and fp8 kinds whose
    op `cuda_fp8` cannot take (another format, unaligned dims, a GPU below compute capability 8.9)."""
    cuda = device.type == "cuda"
    cap = torch.cuda.get_device_capability(device) if cuda else (0, 0)
    always = set(fallback_kinds())
    kinds = set()
    for op in ops:
        if op.kind in always:
            kinds.add(op.kind)
        elif op.kind in cuda_fp8.KERNELS and not cuda_fp8.plan_op_is_native(op, tensors, cuda, cap):
            kinds.add(op.kind)
    return sorted(kinds)
