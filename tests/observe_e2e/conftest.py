"""Fixtures of the end-to-end observability tests."""

from __future__ import annotations

import pytest
import torch

from tests.observe_e2e.runs import build_source


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls: extra threads only add contention on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def source(tmp_path_factory):
    """(model dir, data file), built once for the whole folder."""
    return build_source(tmp_path_factory.mktemp("source"))
