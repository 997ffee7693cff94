"""The host arena: pinned (page-locked) memory, optionally write-combined, and how the device and the host reach it.

* `pinned_arena`: one allocation for every offloaded tensor. Plain pinned memory comes from torch; with
  `use_write_combined` it is allocated by the driver with `CU_MEMHOSTALLOC_WRITECOMBINED` (through numba's
  context: torch has no flag for it). Write-combined memory bypasses the CPU caches: the host writes it in
  streaming bursts and the device reads it over PCIe without snooping the caches, which can speed up the
  transfers; the host *reading* it is uncached and very slow, so the host never reads it directly
  (`read_back`).
* `device_alias`: the arena as a CUDA tensor at the same address (unified virtual addressing maps pinned host
  memory into the device's address space), for kernels that read or write host memory in place (zero copy).
* `read_back`: a host-readable copy of a tensor in write-combined memory, brought through a small device
  buffer in chunks (device DMA reads of write-combined memory are fast; CPU reads are not).
"""

from __future__ import annotations

import numpy as np
import torch

from surogate.numba_kernels._device import pinned_interface

READ_BACK_CHUNK = 16 * 2**20  # bytes per device round trip when reading write-combined memory back


def pinned_arena(nbytes: int, device: torch.device, write_combined: bool = False) -> torch.Tensor:
    """A flat uint8 tensor of `nbytes` pinned host bytes for `device`'s offloaded tensors."""
    if not write_combined:
        return torch.empty(max(int(nbytes), 1), dtype=torch.uint8).pin_memory()
    return _write_combined(max(int(nbytes), 1), device)


def _write_combined(nbytes: int, device: torch.device) -> torch.Tensor:
    from numba import cuda

    index = device.index if device.index is not None else torch.cuda.current_device()
    with cuda.gpus[index]:  # the device's primary context, which torch uses too
        memory = cuda.current_context().memhostalloc(nbytes, mapped=True, wc=True)
    # the ndarray keeps `memory` (and with it the allocation) alive; the tensor keeps the ndarray
    return torch.from_numpy(np.ndarray(shape=(nbytes,), dtype=np.uint8, buffer=memory))


class _HostMemory:
    """A pinned host tensor seen through `__cuda_array_interface__` (numba_kernels' `pinned_interface`)."""

    def __init__(self, arena: torch.Tensor) -> None:
        self.arena = arena  # keeps the memory alive as long as the alias
        self.__cuda_array_interface__ = pinned_interface(arena)


def device_alias(arena: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CUDA tensor over pinned host arena `arena`'s memory (no copy): kernels given its views read and write
    host memory over the bus (`use_zero_copy`, accumulating gradient stores, zeroing offloaded gradients)."""
    if device.index is None:  # "cuda": the current device (an alias on cuda:0 is not equal to "cuda")
        device = torch.device("cuda", torch.cuda.current_device())
    alias = torch.as_tensor(_HostMemory(arena), device=device)
    if alias.data_ptr() != arena.data_ptr() or alias.device != device:
        raise RuntimeError(f"pinned host memory is not addressable from {device} at its host address (no unified "
                           "virtual addressing?): offloaded tensors need it")
    return alias


def read_back(view: torch.Tensor, device: torch.device, chunk: int = READ_BACK_CHUNK) -> torch.Tensor:
    """A copy of host tensor `view` (in write-combined memory) in ordinary host memory, read through `device`
    `chunk` bytes at a time (one device buffer of that size, reused)."""
    if not view.is_contiguous():
        return view.clone()  # never planned (host tensors are whole arena slices); correct, only slow
    out = torch.empty(view.shape, dtype=view.dtype)
    src, dst = view.reshape(-1).view(torch.uint8), out.reshape(-1).view(torch.uint8)
    n = src.numel()
    if n == 0:
        return out
    buffer = torch.empty(min(chunk, n), dtype=torch.uint8, device=device)
    for start in range(0, n, chunk):
        k = min(chunk, n - start)
        buffer[:k].copy_(src[start : start + k])  # device reads the write-combined bytes (DMA)
        dst[start : start + k].copy_(buffer[:k])
    return out
