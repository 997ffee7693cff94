"""Runtime tests run tiny models: one intra-op thread is faster than two on a shared 2-core machine (no
spin-waiting threads) and makes CPU results independent of the thread count."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
