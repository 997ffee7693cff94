"""Compile every kernel for a real GPU target (PTX, sm_90) without a GPU; run as a script.

The simulator runs kernels as Python, so it cannot tell whether Numba can compile them for a device.
This script runs every launcher with small CPU tensors of each supported dtype, but replaces the launch
with `numba.cuda.compile_ptx` on the kernel's Python function and the argument types a real launch
would have. It needs NVVM and NVRTC (a CUDA toolkit), no driver. Prints one line per compiled kernel
and `PTX-OK <count>` at the end; `PTX-UNAVAILABLE <reason>` when the toolkit is missing.
"""

from __future__ import annotations

import os
import sys

os.environ["NUMBA_ENABLE_CUDASIM"] = "0"


def _numba_type(arg):
    import torch
    from numba import types

    if isinstance(arg, torch.Tensor):
        dt = {
            torch.float32: types.float32,
            torch.bfloat16: types.int16,
            torch.int16: types.int16,
            torch.int32: types.int32,
            torch.int64: types.int64,
            torch.uint8: types.uint8,
            torch.int8: types.int8,
        }[arg.dtype]
        return types.Array(dt, arg.dim(), "C" if arg.is_contiguous() else "A")
    if isinstance(arg, bool):
        return types.boolean
    if isinstance(arg, int):
        return types.int64
    if isinstance(arg, float):
        return types.float64
    raise TypeError(f"unexpected kernel argument {type(arg)}")


def main() -> int:
    try:
        from numba import cuda

        cuda.compile_ptx(lambda a: None, "(float32[::1],)", cc=(9, 0))
    except Exception as exc:  # missing NVVM / NVRTC: nothing to check here
        print(f"PTX-UNAVAILABLE {type(exc).__name__}: {str(exc).splitlines()[0]}")
        return 0

    import importlib

    from surogate.numba_kernels import _device

    compiled: dict = {}

    def fake_launch(kernel, grid, block, *args):
        sig = tuple(_numba_type(a) for a in args)
        key = (kernel, sig)
        if key not in compiled:
            compiled[key] = cuda.compile_ptx(kernel.py_func, sig, cc=(9, 0))
            print(f"compiled {kernel.py_func.__module__}.{kernel.py_func.__qualname__} {sig}", flush=True)

    _device._max_resident_blocks = lambda: 1056
    mods = importlib.import_module("tests.kernels.ptx_cases")
    for name in [n for n in dir(mods) if n.startswith("case_")]:
        mods.patch_launch(fake_launch)
        getattr(mods, name)()
    print(f"PTX-OK {len(compiled)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
