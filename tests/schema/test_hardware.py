"""The one GPU-requirement table: what each recipe / QLoRA mode needs, and the notices derived from it."""

from __future__ import annotations

import pytest

from surogate.schema import (
    config_from_dict,
    gpu_requirements,
    hardware_requirements,
    min_compute_capability,
    sm_of,
)
from tests.schema.helpers import BASE, check


@pytest.mark.parametrize(
    "options, need, fields",
    [
        ({}, 0, []),
        ({"recipe": "fp8_hybrid"}, 89, ["recipe"]),
        ({"recipe": "nvfp4"}, 100, ["recipe"]),
        ({"recipe": "nvfp4_quartet"}, 100, ["recipe"]),
        ({"qlora_fp4": True}, 100, ["qlora_fp4"]),
        ({"qlora_fp8": True}, 0, []),  # the contract gives FP8 QLoRA no hardware requirement
        ({"qlora_bnb": True}, 0, []),
        ({"recipe": "fp8_hybrid", "qlora_fp4": True}, 100, ["qlora_fp4"]),  # the highest one decides
        ({"recipe": "nvfp4", "qlora_fp4": True}, 100, ["recipe", "qlora_fp4"]),
    ],
)
def test_min_compute_capability(options, need, fields):
    cfg = config_from_dict({**BASE, **options})
    got, why = min_compute_capability(cfg)
    assert got == need
    assert [r.field for r in why] == fields
    assert all(f"SM{need}+" in r.what for r in why)
    assert min_compute_capability(cfg.to_dict()) == (got, why)  # plan configs are plain dicts


def test_qlora_fp8_is_a_soft_requirement():
    cfg = config_from_dict({**BASE, "qlora_fp8": True})
    (req,) = gpu_requirements(cfg)
    assert (req.field, req.min_sm, req.hard) == ("qlora_fp8", 89, False)
    assert "dequantize" in req.what
    assert hardware_requirements(cfg) == []
    result = check(qlora_fp8=True)
    assert result.ok
    notices = [(n.kind, n.path, n.message) for n in result.notices if n.path == "qlora_fp8"]
    assert notices == [("requirement", "qlora_fp8", req.what)]  # validation cannot know the GPU: no warning


@pytest.mark.parametrize("options", [{"recipe": "fp8_hybrid"}, {"recipe": "nvfp4"}, {"qlora_fp4": True},
                                     {"recipe": "fp8_hybrid", "qlora_fp4": True}])
def test_notices_and_texts_come_from_the_table(options):
    cfg = config_from_dict({**BASE, **options})
    reqs = gpu_requirements(cfg)
    assert reqs and all(r.hard for r in reqs)
    assert hardware_requirements(cfg) == [r.what for r in reqs]
    notices = {(n.path, n.message) for n in check(**options).notices if n.kind == "requirement"}
    assert notices == {(r.field, r.what) for r in reqs}
    assert not [n for n in check(**options).notices if n.kind == "warning"]


def test_sm_of():
    assert sm_of((8, 9)) == 89 and sm_of([10, 0]) == 100 and sm_of((12, 0)) == 120
