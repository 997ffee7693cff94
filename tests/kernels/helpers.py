"""Tolerances and small tensor factories shared by the kernel tests."""

from __future__ import annotations

import torch

DTYPES = (torch.float32, torch.bfloat16)


def tol(dtype: torch.dtype) -> dict:
    """fp32: a few ulp of accumulated rounding; bf16: about one bf16 ulp (2^-8 relative)."""
    if dtype == torch.float32:
        return {"atol": 1e-5, "rtol": 1e-5}
    return {"atol": 1e-2, "rtol": 1.6e-2}


def close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    torch.testing.assert_close(a.float(), b.float(), **tol(dtype or a.dtype))
