"""Rank processes and the tests that compare them run tiny models: one intra-op thread (the runtime tests' fixture)."""

import pytest

from surogate.compiler.passes.fusion import OFF_ENV
from tests.runtime.conftest import _one_thread  # noqa: F401 - autouse fixture, shared with tests/runtime


@pytest.fixture(scope="module")
def same_program_at_every_world_size():
    """The fold of the LoRA up-projections (fold_lora_up_projection) needs the stacked down-projections, which
    ZeRO-2/3 plans do not get (transient reduce-scattered gradients, weight shards): one process would run the
    folded GEMMs (base + LoRA rounded once) and the ranks the merges, and 8-bit AdamW turns that fp32 rounding
    into code flips. The comparison here is of the distribution, so both sides run the unfolded program; the fold is
    checked against the unfolded program in tests/cuda_backend/test_lora_fold.py."""
    mp = pytest.MonkeyPatch()
    mp.setenv(OFF_ENV, "fold_lora_up_projection")
    yield
    mp.undo()
