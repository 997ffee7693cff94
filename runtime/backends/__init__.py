"""Kernel tables of the executor, one per backend: op kind -> kernel(inputs, attrs, ctx) -> outputs."""

from __future__ import annotations

from typing import Any

BACKENDS = ("cpu", "cuda")


def kernel_table(backend: str) -> dict[str, Any]:
    """The kernel table of `backend` ('cpu' runs anywhere; 'cuda' needs a GPU and the CUDA backend)."""
    from surogate.errors import NotAvailableError

    if backend == "cpu":
        from surogate.runtime.backends.cpu import KERNELS

        return KERNELS
    if backend == "cuda":
        raise NotAvailableError(
            "the cuda backend of the executor has not landed yet; this version trains on the cpu backend"
        )
    raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
