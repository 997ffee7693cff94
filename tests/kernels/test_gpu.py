"""Real-GPU check of every registry kernel against its reference (both dtypes).

Runs only with a CUDA device and the simulator off:
    NUMBA_ENABLE_CUDASIM=0 pytest -m gpu tests/kernels/test_gpu.py
Tolerances allow for the GPU's fused multiply-adds and libdevice math (a few fp32 ulps); uint8 codes may
flip at exact rounding ties, so at most 1% of codes may differ by one step.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from surogate.numba_kernels import KERNELS
from surogate.numba_kernels._device import is_simulator

from .cases import CASES


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        if not obj.is_contiguous() and obj.dim() and min(obj.stride()) > 0:
            # a strided view (a column slice of a wider matrix) keeps its strides on the device: `.to` would
            # hand the kernel a contiguous copy and leave the strided path untested
            moved = torch.empty_strided(obj.shape, obj.stride(), dtype=obj.dtype, device=device)
            return moved.copy_(obj)
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(v, device) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: _to(getattr(obj, f.name), device) for f in dataclasses.fields(obj)})
    return obj


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (tuple, list)):
        for v in obj:
            yield from _tensors(v)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(KERNELS))
def test_kernel_on_gpu_matches_reference(name, dtype):
    if is_simulator():
        pytest.skip("NUMBA_ENABLE_CUDASIM=1: run with NUMBA_ENABLE_CUDASIM=0 to test on the GPU")
    args, kwargs, atol = CASES[name](dtype)
    ref = copy.deepcopy((args, kwargs))
    KERNELS[name].reference(*ref[0], **ref[1])
    on_gpu = _to((args, kwargs), "cuda")
    KERNELS[name].cuda(*on_gpu[0], **on_gpu[1])
    torch.cuda.synchronize()
    tol = max(atol, 2e-5) if dtype == torch.float32 else max(atol, 1.6e-2)
    for got, want in zip(_tensors(on_gpu), _tensors(ref), strict=True):
        got = got.cpu()
        if got.is_floating_point():
            torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol, equal_nan=True)
        else:
            assert (got != want).float().mean() <= 0.01, name


@pytest.mark.gpu
def test_pinned_host_tensors_are_read_and_written_in_place():
    """`use_zero_copy`: optimizer states in pinned host memory go to the kernels without a copy."""
    if is_simulator():
        pytest.skip("NUMBA_ENABLE_CUDASIM=1: run with NUMBA_ENABLE_CUDASIM=0 to test on the GPU")
    args, kwargs, _ = CASES["adamw8bit_step"](torch.float32)
    ref = copy.deepcopy((args, kwargs))
    KERNELS["adamw8bit_step"].reference(*ref[0], **ref[1])
    on_gpu = _to((args, kwargs), "cuda")
    param, grad, state, hp = on_gpu[0]
    # the 8-bit moments live in pinned host memory, as offloaded optimizer states do (offload_optimizer)
    state = {k: v.cpu().pin_memory() for k, v in state.items()}
    assert all(v.is_pinned() for v in state.values())
    KERNELS["adamw8bit_step"].cuda(param, grad, state, hp, **on_gpu[1])
    torch.cuda.synchronize()
    for got, want in zip(_tensors(((param, grad, state, hp), on_gpu[1])), _tensors(ref), strict=True):
        got = got.cpu()
        if got.is_floating_point():
            torch.testing.assert_close(got.float(), want.float(), atol=2e-5, rtol=2e-5, equal_nan=True)
        else:
            assert (got != want).float().mean() <= 0.01
