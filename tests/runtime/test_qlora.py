"""QLoRA on the cpu backend: 4-bit codes stored packed (two per byte) in the arena, dequantized by the
plan's own ops; the executor reproduces the reference interpreter (which keeps one code per byte)."""

from __future__ import annotations

import pytest
import torch

from surogate.compiler.ir import Role
from surogate.runtime.batches import plan_inputs
from surogate.runtime.executor import pack_nibbles, unpack_nibbles
from surogate.runtime.reference import load_weights, run_graph
from surogate.runtime.trainer import loss_tensor
from tests.runtime.helpers import PlanRunner, make_cfg, random_batch, rel_err, save_model


def test_nibble_packing_round_trips_odd_sizes():
    codes = torch.randint(0, 16, (3, 5), dtype=torch.uint8)
    packed = pack_nibbles(codes)
    assert packed.numel() == 8  # 15 codes -> 8 bytes
    assert torch.equal(unpack_nibbles(packed, (3, 5)), codes)


@pytest.mark.parametrize("double_quant", [False, True])
def test_qlora_bnb_micro_step_matches_the_reference_interpreter(tmp_path, double_quant):
    model = save_model(tmp_path / "m", "qwen3")
    cfg = make_cfg(model, lora=True, lora_rank=4, qlora_bnb=True, qlora_bnb_block_size=64,
                   qlora_bnb_double_quant=double_quant)
    runner = PlanRunner(cfg)
    plan = runner.plan
    quant = [t for t in plan.tensors.values() if t.role is Role.QUANT_WEIGHT]
    assert quant and all(t.dtype == "nf4" for t in quant)
    for t in quant:  # stored at half a byte per parameter in the arena
        assert runner.ex.views[t.name].numel() == (t.numel + 1) // 2
    ids, labels = random_batch(2, 16)
    loss, grads = runner.micro_step(ids, labels)

    class PlanGraph:  # the same op list, run by the dict-based reference interpreter
        tensors = plan.tensors

        def ops(self):
            return iter(plan.ops[: plan.meta.get("optimizer_start", len(plan.ops))])

    values = load_weights(plan, cfg.model, lora_seed=int(cfg.train_seed))
    b, t = ids.shape
    batch = {"input_ids": ids, "labels": labels, "position_ids": torch.arange(t).expand(b, t),
             "cu_seqlens": torch.arange(0, b * t + 1, t)}
    values.update(plan_inputs(plan, batch))
    run_graph(PlanGraph(), values)
    assert loss == pytest.approx(float(values[loss_tensor(plan)]), rel=1e-6)
    lora_grads = {t.attrs["grad_of"]: values[n] for n, t in plan.tensors.items()
                  if t.role is Role.GRADIENT and n in values}
    assert lora_grads and set(lora_grads) == set(grads)
    for name, g in lora_grads.items():
        assert rel_err(grads[name], g) < 1e-6, name


def test_qlora_run_exports_an_adapter_and_a_model_merged_into_the_original_weights(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from surogate.runtime.session import run_training
    from tests.runtime.helpers import text_cfg, write_text_data

    model = save_model(tmp_path / "m", "qwen3")
    data = write_text_data(tmp_path / "train.txt")
    cfg = text_cfg(model, data, tmp_path / "out", lora=True, lora_rank=4, lora_alpha=8, qlora_bnb=True,
                   merge_adapter=True, max_steps=3, learning_rate=1e-2)
    result = run_training(cfg)
    assert result.steps == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    adapter = load_file(f"{result.outputs['adapter']}/adapter_model.safetensors")
    merged = AutoModelForCausalLM.from_pretrained(result.outputs["merged"], dtype=torch.float32).state_dict()
    original = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).state_dict()
    name = "model.layers.0.self_attn.q_proj"
    a = adapter[f"base_model.model.{name}.lora_A.weight"].float()
    b = adapter[f"base_model.model.{name}.lora_B.weight"].float()
    assert b.abs().max() > 0  # trained
    # merged = the original (unquantized) weight + alpha/r * B @ A, not the 4-bit approximation
    torch.testing.assert_close(merged[f"{name}.weight"], original[f"{name}.weight"] + 2.0 * (b @ a))


def test_four_over_six_never_loses_to_plain_fp4_scaling():
    """qlora_four_over_six: each block keeps whichever of the max-6 / max-4 scalings reconstructs it better."""
    from surogate.runtime.reference.quant import _blocks, dequantize, quantize

    torch.manual_seed(0)
    w = torch.randn(64, 48) * torch.rand(64, 1) * 3
    errors = {}
    for four_six in (False, True):
        parts = quantize("fp4", w, 16, four_over_six=four_six)
        errors[four_six] = (_blocks(dequantize("fp4", parts, w.shape, 16) - w, 16) ** 2).sum(1)
    assert torch.all(errors[True] <= errors[False] + 1e-12)
    assert errors[True].sum() < 0.95 * errors[False].sum()  # and it matters on such data


@pytest.mark.parametrize("four_six", [True, False])
def test_qlora_fp4_plan_carries_four_over_six(tmp_path, four_six):
    model = save_model(tmp_path / "m", "qwen3")
    plan = PlanRunner(make_cfg(model, lora=True, lora_rank=4, qlora_fp4=True, qlora_four_over_six=four_six)).plan
    quant = [t for t in plan.tensors.values() if t.role is Role.QUANT_WEIGHT]
    assert quant and all(t.attrs["four_over_six"] is four_six for t in quant)
