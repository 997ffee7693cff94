"""Shared test setup: GPU tests skip without CUDA; under pytest-xdist (`-n 2`, the README's test command) each
worker gets its share of the cores, and tests that need the machine's Ray clusters to themselves take a lock."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator

import pytest


def pytest_configure(config):
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        # each worker (and each process a test starts: they inherit the environment) gets its share of the
        # cores, so that two workers do not each run two torch threads on a 2-core machine
        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        import torch

        torch.set_num_threads(threads)


@pytest.fixture
def ray_to_itself(tmp_path_factory) -> Iterator[None]:
    """Hold a lock shared by this session's workers while the test runs: `ray_address: auto` finds any local
    cluster on the machine, so a test that starts one (or expects none) must not overlap another."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's folder, shared by its workers
    with open(root / "ray.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
