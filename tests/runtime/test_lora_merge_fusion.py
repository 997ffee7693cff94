"""The fused LoRA merge changes no number on the cpu backend: a bf16 model's LoRA step with and without
`fuse_lora_merge` gives bitwise-equal losses and gradients (fp32 and bf16 adapters, recompute on)."""

from __future__ import annotations

import pytest
import torch

from surogate.compiler.passes import fusion, lora_fold
from tests.runtime.helpers import PlanRunner, make_cfg, random_batch, save_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_model(tmp_path_factory.mktemp("fusion") / "qwen3", "qwen3")


def _run(model_dir, lora_dtype: str, fused: bool, monkeypatch):
    monkeypatch.setattr(fusion, "ENABLED", fused)
    # the merges themselves: not folded into the base GEMMs (bf16 adapters would be; that is another rounding,
    # checked in tests/cuda_backend/test_lora_fold.py)
    monkeypatch.setattr(lora_fold, "ENABLED", False)
    cfg = make_cfg(model_dir, torch_dtype="bfloat16", lora=True, lora_rank=4, lora_alpha=12, lora_dtype=lora_dtype,
                   recompute=True)
    runner = PlanRunner(cfg)
    kinds = {op.kind for op in runner.plan.ops}
    assert ("lora_merge" in kinds) == fused
    assert any(n.endswith(".lora_b") for n in runner.plan.tensors) != fused
    g = torch.Generator().manual_seed(7)
    for name, t in runner.plan.tensors.items():  # non-zero B (PEFT starts it at zero): the product matters
        if ".lora_B." in name and name in runner.ex.views:
            runner.ex.write(name, (torch.randn(t.shape, generator=g) * 0.05))
    ids, labels = random_batch(2, 16, seed=5)
    return runner.micro_step(ids, labels, step=1)


@pytest.mark.parametrize("lora_dtype", ["fp32", "bf16"])
def test_fused_and_unfused_plans_agree_bitwise(model_dir, lora_dtype, monkeypatch):
    loss0, g0 = _run(model_dir, lora_dtype, False, monkeypatch)
    loss1, g1 = _run(model_dir, lora_dtype, True, monkeypatch)
    assert loss0 == loss1
    assert set(g0) == set(g1) and any(".lora_A." in n for n in g0)
    for name in g0:
        assert torch.equal(g0[name], g1[name]), name
        assert g0[name].abs().sum() > 0, name  # every adapter gets a gradient
