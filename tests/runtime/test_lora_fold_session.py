"""A training run whose LoRA projections are folded into their base GEMMs (fold_lora_up_projection: no dropout,
adapters in the activations' dtype) through the session: the frozen weights load through their column views of
[W | tail], a resumed run continues bitwise (the tails are rewritten from the restored B in the first forward),
and the merged export equals PEFT's merge of the exported adapter into the base model."""

from __future__ import annotations

import json

import torch

from surogate.compiler.pipeline import compile_plan
from surogate.runtime.session import run_training
from tests.runtime.helpers import save_model, text_cfg, write_text_data


def _losses(out) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "step" in r and "loss" in r}


def test_folded_lora_run_resumes_bitwise_and_exports_what_peft_merges(tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = save_model(tmp_path / "model", "qwen3")
    data = tmp_path / "train.jsonl"
    write_text_data(data, rows=32)

    def cfg(out, steps):  # (inside the warm-up the LR does not depend on max_steps: the 2-step run is the
        # 4-step run's first half)
        return text_cfg(model, data, out, lora=True, lora_rank=8, lora_alpha=16, lora_dropout=0.0, max_steps=steps,
                        save_steps=2, merge_adapter=True, warmup_steps=50)

    assert compile_plan(cfg(tmp_path / "x", 4)).meta["lora_folded"] > 0
    run_training(cfg(tmp_path / "straight", 4), backend="cpu")
    run_training(cfg(tmp_path / "resumed", 2), backend="cpu")
    result = run_training(cfg(tmp_path / "resumed", 4), backend="cpu")  # from checkpoint-2
    straight, resumed = _losses(tmp_path / "straight"), _losses(tmp_path / "resumed")
    assert sorted(straight) == [1, 2, 3, 4] and result.steps == 4
    assert all(resumed[s] == straight[s] for s in straight), (resumed, straight)
    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    want = PeftModel.from_pretrained(base, tmp_path / "straight" / "adapter").merge_and_unload().state_dict()
    got = {}
    for f in sorted((tmp_path / "straight" / "merged").glob("*.safetensors")):
        got |= load_file(str(f))
    assert got and all(torch.equal(got[k], want[k]) for k in got if k in want)
    assert any("q_proj" in k for k in got)
