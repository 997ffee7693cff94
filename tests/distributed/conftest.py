"""Rank processes and the tests that compare them run tiny models: one intra-op thread (the runtime tests' fixture)."""

from tests.runtime.conftest import _one_thread  # noqa: F401 - autouse fixture, shared with tests/runtime
