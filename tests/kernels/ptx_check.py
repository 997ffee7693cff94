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
        from surogate.numba_kernels._device import get_cuda

        cuda = get_cuda()

        cuda.compile_ptx(lambda a: None, "(float32[::1],)", cc=(9, 0))
    except Exception as exc:  # missing NVVM / NVRTC: nothing to check here
        print(f"PTX-UNAVAILABLE {type(exc).__name__}: {str(exc).splitlines()[0]}")
        return 0

    import torch

    from surogate.numba_kernels import KERNELS

    from .cases import kernel_name, launch_every_case

    compiled: dict = {}

    def fake_launch(kernel, grid, block, *args):
        sig = tuple(_numba_type(a) for a in args)
        key = (kernel, sig)
        if key not in compiled:
            ptx, _ = cuda.compile_ptx(kernel.py_func, sig, cc=(9, 0))
            compiled[key] = ptx
            # fp64 arithmetic in a kernel is a silent 2-64x slowdown: count it
            lines = [ln.strip() for ln in ptx.splitlines() if not ln.strip().startswith("//")]
            f64 = sum(1 for ln in lines if ".f64" in ln)
            # ... and so is 64-bit integer division (emulated): per-element loops should have none
            div64 = sum(1 for ln in lines if ln.startswith(("div.s64", "div.u64", "rem.s64", "rem.u64")))
            print(f"compiled {kernel_name(kernel)} ({len(sig)} args) f64-lines={f64} div64={div64}", flush=True)

    launch_every_case(fake_launch)
    # RMSNorm kernels are built per row length (the row lives in registers): an odd one, and Qwen3-0.6B's 1024 in bf16
    for hidden, dt in ((300, torch.float32), (1024, torch.bfloat16)):
        x, w = torch.zeros(2, hidden, dtype=dt), torch.zeros(hidden, dtype=dt)
        KERNELS["rmsnorm_fwd"].cuda(x, w, x, torch.zeros(2), 1e-6)
        KERNELS["rmsnorm_bwd"].cuda(x, x, w, torch.zeros(2), x, w)
        KERNELS["rmsnorm_bwd"].cuda(x, x, w, None, x, w, eps=1e-6)  # rstd recomputed (the backend's call)
        KERNELS["rmsnorm_bwd"].cuda(x, x, w, None, x, None, eps=1e-6)  # a frozen weight: no dweight work
    # the q/k norm + rope backward without dweight (LoRA's frozen q/k norms), Qwen3's head_dim 128 in bf16
    qk, qw = torch.zeros(2, 2, 128, dtype=torch.bfloat16), torch.zeros(128, dtype=torch.bfloat16)
    tab, pos = torch.zeros(4, 64), torch.zeros(2, dtype=torch.int64)
    KERNELS["rmsnorm_rope_bwd"].cuda(qk, qk, qw, qk, None, torch.zeros(8, 128), 1e-6, pos, tab, tab)
    # CE tiles beyond the cases' (int64 words, float32): int32 words (width 6), scalar bf16 (odd width 7), and the
    # gradient with its scale read on the device (the cuda backend's call)
    from surogate.numba_kernels import cross_entropy as ce

    lab, f = torch.zeros(3, dtype=torch.int64), torch.zeros(3)
    for vt, dt in ((6, torch.bfloat16), (7, torch.bfloat16), (8, torch.bfloat16), (8, torch.float32)):
        b = torch.zeros(3, vt, dtype=dt)
        ce.launch_stats(b, lab, 0, True, f, f, f)
        ce.launch_grad(b, lab, f, 0, torch.ones(1), -100)
        ce.launch_fused(b, lab, 1.0, -100, f, f)
        ce.launch_fused(b, lab, torch.ones(1), -100, f, f)  # the fused loss op's call (pass fuse_lm_head_ce)
    # LoRA merge variants beyond the cases' (bf16 model, fp32 adapters): bf16 adapters, and a rank above R_MAX
    base, out = torch.zeros(3, 40, dtype=torch.bfloat16), torch.zeros(3, 40, dtype=torch.bfloat16)
    KERNELS["lora_merge"].cuda(base, torch.zeros(3, 4, dtype=torch.bfloat16), torch.zeros(40, 4, dtype=torch.bfloat16),
                               out, 2.0)
    KERNELS["lora_merge"].cuda(base, torch.zeros(3, 65), torch.zeros(40, 65), out, 2.0)
    # RMSNorm writing into a column view ([x | h] of pass fold_lora_up_projection: rows strided), with and
    # without the fused residual
    xb, wb = torch.zeros(3, 64, dtype=torch.bfloat16), torch.zeros(64, dtype=torch.bfloat16)
    wide = torch.zeros(3, 112, dtype=torch.bfloat16)
    KERNELS["rmsnorm_fwd"].cuda(xb, wb, wide[:, :64], torch.zeros(3), 1e-6)
    KERNELS["rmsnorm_fwd"].cuda(xb, wb, wide[:, :64], torch.zeros(3), 1e-6, residual=xb, sum_out=xb.clone())
    # RMSNorm backward reading dy from [dx | dh] (rows strided)
    KERNELS["rmsnorm_bwd"].cuda(wide[:, :64], xb, wb, None, xb.clone(), None, eps=1e-6)
    print(f"PTX-OK {len(compiled)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
