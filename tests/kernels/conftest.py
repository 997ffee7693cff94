"""Kernel tests run on CPU under the Numba CUDA simulator.

NUMBA_ENABLE_CUDASIM is set here, at import, before anything imports numba.cuda. It only changes what
`numba.cuda` is (the simulator instead of the driver); the surogate.numba_kernels package imports
numba.cuda lazily, inside launchers, so other test folders' code is unaffected. GPU decisions elsewhere
must use torch.cuda.is_available(), which the simulator does not touch.
"""

from __future__ import annotations

import os

os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


@pytest.fixture(scope="session", autouse=True)
def _simulator_active():
    from surogate.numba_kernels._device import is_simulator

    if not is_simulator() and not torch.cuda.is_available():
        pytest.skip("numba.cuda was imported before NUMBA_ENABLE_CUDASIM was set and no GPU is present")
