"""IR dtype names -> torch dtypes (sub-byte formats are stored packed in uint8)."""

from __future__ import annotations

import torch

TORCH_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "int32": torch.int32,
    "int64": torch.int64,
    "bool": torch.bool,
    "nf4": torch.uint8,
    "fp4_e2m1": torch.uint8,
}


def common(*ts: torch.Tensor) -> torch.dtype:
    """The dtype two operands of a matmul are computed in (the wider float, as PEFT casts inputs to fp32 adapters)."""
    dt = ts[0].dtype
    for t in ts[1:]:
        dt = torch.promote_types(dt, t.dtype)
    return dt
