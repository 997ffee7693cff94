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
        from surogate.numba_kernels._device import cuda_backend_available

        if not cuda_backend_available():
            raise NotAvailableError("the cuda backend needs a CUDA GPU (none is visible to torch); use the cpu backend")
        from surogate.runtime.backends.cuda import make_kernel_table

        return make_kernel_table()  # a fresh table per call: its caches belong to one executor
    raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
