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


# Start of a script that compiles kernels to sm_90 PTX in a fresh process (no simulator, no GPU needed): prints
# PTX-UNAVAILABLE and exits where NVVM/NVRTC are missing. A test appends its compile calls and prints PTX-DONE.
PTX_PREAMBLE = r"""
import os, re, sys
os.environ["NUMBA_ENABLE_CUDASIM"] = "0"
import torch
from surogate.numba_kernels import _device
from surogate.numba_kernels._device import get_cuda
from tests.kernels.ptx_check import _numba_type
_device._max_resident_blocks = lambda: 1056  # grids as on an H100 (no device here)
try:
    cuda = get_cuda()
    cuda.compile_ptx(lambda a: None, "(float32[::1],)", cc=(9, 0))
except Exception as exc:
    print("PTX-UNAVAILABLE", type(exc).__name__, str(exc).splitlines()[0])
    sys.exit(0)
"""


def run_ptx_script(script: str) -> list[list[str]]:
    """Run `script` (PTX_PREAMBLE + the test's part) in a subprocess; skip the test when PTX cannot be built
    here; its whitespace-split output lines before the final PTX-DONE."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import pytest

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "0"}
    out = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True,
                         timeout=600)
    if "PTX-UNAVAILABLE" in out.stdout:
        pytest.skip(out.stdout.strip().splitlines()[-1])
    assert out.returncode == 0 and "PTX-DONE" in out.stdout, out.stderr[-3000:]
    return [ln.split() for ln in out.stdout.splitlines()[:-1]]
