"""Every config in examples/ validates as written."""

from __future__ import annotations

from pathlib import Path

import pytest

from surogate.schema import validate_file

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))
SCENARIOS = {
    "qwen3-lora-bf16", "qwen3-qlora-bnb", "qwen3-qlora-fp8", "qwen3-fp8-hybrid", "qwen3-full-finetune",
    "pretrain-from-scratch", "multi-gpu-zero3-offload", "multi-node-ray", "qwen3-normuon",
}


def test_every_documented_scenario_has_an_example():
    assert SCENARIOS <= {p.stem for p in EXAMPLES}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_validates(path):
    result = validate_file(path)
    assert result.ok, "\n".join(map(str, result.errors))
    assert not [n for n in result.notices if n.kind == "warning"], result.notices
