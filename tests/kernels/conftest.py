"""Kernel tests run on CPU under the Numba CUDA simulator.

NUMBA_ENABLE_CUDASIM is set here, at import, before anything imports numba.cuda. It only changes what
`numba.cuda` is (the simulator instead of the driver) for code that imports numba.cuda afterwards; the
surogate.numba_kernels package imports numba.cuda lazily, inside launchers, so other test folders' code
(and their subprocesses, which inherit the variable) are unaffected unless they use numba.cuda
themselves. GPU decisions elsewhere must use torch.cuda.is_available(), which the simulator does not
touch (numba.cuda.is_available() is True under the simulator).
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")
if "numba" in sys.modules and "numba.cuda" not in sys.modules:
    # numba read its environment when it was imported (by an earlier test module); make it re-read it
    sys.modules["numba"].core.config.reload_config()

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _simulator_for_cpu_tests(request):
    """CPU-tensor kernel tests need the simulator; with NUMBA_ENABLE_CUDASIM=0 only the gpu tests run."""
    from surogate.numba_kernels._device import is_simulator

    if not is_simulator() and "gpu" not in request.keywords:
        pytest.skip("numba.cuda is not the simulator (NUMBA_ENABLE_CUDASIM=0): CPU kernel tests skipped")
