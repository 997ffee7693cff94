"""The cuda backend's CPU tests run its kernel table on CPU tensors under the Numba CUDA simulator.

NUMBA_ENABLE_CUDASIM is set here, at import, before anything imports numba.cuda (as tests/kernels does).
GPU tests (marked `gpu`) need NUMBA_ENABLE_CUDASIM=0 and a CUDA device; they skip otherwise.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")
if "numba" in sys.modules and "numba.cuda" not in sys.modules:
    sys.modules["numba"].core.config.reload_config()

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.runtime.conftest import _one_thread  # noqa: E402, F401 - autouse fixture, shared with tests/runtime


@pytest.fixture(autouse=True)
def _simulator_for_cpu_tests(request):
    from surogate.numba_kernels._device import is_simulator

    if "gpu" in request.keywords:
        if is_simulator() or not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU and NUMBA_ENABLE_CUDASIM=0")
    elif not is_simulator():
        pytest.skip("numba.cuda is not the simulator (NUMBA_ENABLE_CUDASIM=0): CPU tests of the cuda table skipped")
