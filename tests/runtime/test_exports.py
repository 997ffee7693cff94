"""Outputs load in the Hugging Face stack and compute what our runtime computed: after a short LoRA run the
adapter loads with `peft.PeftModel.from_pretrained` and the merged model (`merge_adapter: true`) with
`AutoModelForCausalLM.from_pretrained`, each giving our final eval loss; PEFT and merged logits agree; a full
fine-tune's exported model gives our eval loss too."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from surogate.runtime.session import run_training
from tests.runtime.helpers import eval_batches, hf_eval, save_model, text_cfg, write_text_data

TOL = 1e-5


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    save_model(root / "model", "qwen3", tie=True)
    write_text_data(root / "train.jsonl", rows=60)
    return root


def _cfg(root, name, **over):
    # unpacked rows so the HF models see exactly our attention pattern (document + padding segment)
    return text_cfg(root / "model", root / "train.jsonl", root / name, sample_packing=False,
                    validation_split_ratio=0.2, max_steps=3, learning_rate=1e-2, eval_steps=1000, **over)


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")


def test_lora_adapter_and_merged_model_load_and_match(root):
    from peft import PeftModel

    # lora_dropout > 0: evaluation must run without dropout (as HF eval() does)
    cfg = _cfg(root, "lora", lora=True, lora_rank=4, lora_alpha=8, lora_dropout=0.3, merge_adapter=True)
    result = run_training(cfg)
    assert set(result.outputs) == {"adapter", "merged"}
    ours = result.eval_losses[-1][1]
    adapter = load_file(f"{result.outputs['adapter']}/adapter_model.safetensors")
    assert any(".lora_B." in k and v.abs().sum() > 0 for k, v in adapter.items())  # the adapter trained

    batches = eval_batches(cfg)
    base_loss, _ = hf_eval(_load(root / "model"), batches)
    peft_loss, peft_logits = hf_eval(PeftModel.from_pretrained(_load(root / "model"), result.outputs["adapter"]),
                                     batches)
    merged_loss, merged_logits = hf_eval(_load(result.outputs["merged"]), batches)
    assert abs(base_loss - ours) > 1e-3  # not vacuous: training changed the eval loss
    assert abs(peft_loss - ours) <= TOL * ours, (peft_loss, ours)
    assert abs(merged_loss - ours) <= TOL * ours, (merged_loss, ours)
    for a, b in zip(peft_logits, merged_logits, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def test_full_finetune_model_loads_and_matches(root):
    cfg = _cfg(root, "full", lora=False)
    result = run_training(cfg)
    assert set(result.outputs) == {"model"}
    ours = result.eval_losses[-1][1]
    batches = eval_batches(cfg)
    loss, _ = hf_eval(_load(result.outputs["model"]), batches)
    base_loss, _ = hf_eval(_load(root / "model"), batches)
    assert abs(base_loss - ours) > 1e-3
    assert abs(loss - ours) <= TOL * ours, (loss, ours)


def test_exported_model_carries_the_training_template_and_response_prefix(root):
    from transformers import AutoTokenizer

    from surogate.runtime.data.templates import CHAT_TEMPLATE_MAPPING

    cfg = _cfg(root, "template", lora=False, template="chatml", response_prefix="<think>\\n")  # YAML's literal \n
    result = run_training(cfg)
    folder = result.outputs["model"]
    assert (Path(folder) / "chat_template.jinja").read_text().startswith(CHAT_TEMPLATE_MAPPING["chatml"])
    tok = AutoTokenizer.from_pretrained(folder)
    chat = [{"role": "user", "content": "hi"}]
    prompt = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n"
    assert tok.apply_chat_template(chat, tokenize=False) == "<|im_start|>user\nhi<|im_end|>\n"  # as trained
    plain = run_training(_cfg(root, "plain", lora=False))  # no template, no prefix: the source's files as they are
    assert not (Path(plain.outputs["model"]) / "chat_template.jinja").exists()


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory):
    """A short LoRA run on a tiny Qwen3-MoE with `train_router` (the router is trained in full)."""
    from transformers import Qwen3MoeConfig

    from tests.runtime.helpers import TINY
    from tests.runtime_support.helpers import save_tiny_tokenizer

    root = tmp_path_factory.mktemp("moe")
    torch.manual_seed(0)
    config = Qwen3MoeConfig(**TINY, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                            norm_topk_prob=True, tie_word_embeddings=False)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(root / "model")
    save_tiny_tokenizer(root / "model")
    write_text_data(root / "train.jsonl", rows=40)
    cfg = text_cfg(root / "model", root / "train.jsonl", root / "out", sample_packing=False,
                   validation_split_ratio=0.2, max_steps=3, learning_rate=1e-2, lora=True, lora_rank=4,
                   lora_target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], train_router=True,
                   merge_adapter=True)
    return root, cfg, run_training(cfg)


def test_moe_train_router_merged_model_keeps_the_trained_router(moe_run):
    root, cfg, result = moe_run
    ours = result.eval_losses[-1][1]
    merged = _load(result.outputs["merged"])
    trained = load_file(f"{result.outputs['merged']}/model.safetensors")
    assert "model.layers.0.mlp.gate.weight" in trained
    original = load_file(str(root / "model" / "model.safetensors"))
    assert not torch.equal(trained["model.layers.0.mlp.gate.weight"], original["model.layers.0.mlp.gate.weight"])
    loss, _ = hf_eval(merged, eval_batches(cfg))
    assert abs(loss - ours) <= TOL * ours, (loss, ours)


def test_moe_train_router_adapter_carries_the_router(moe_run):
    from peft import PeftModel

    root, cfg, result = moe_run
    saved = load_file(f"{result.outputs['adapter']}/adapter_model.safetensors")
    assert any(".mlp.gate." in k for k in saved), sorted(saved)[:4]
    model = PeftModel.from_pretrained(_load(root / "model"), result.outputs["adapter"])
    loss, _ = hf_eval(model, eval_batches(cfg))
    ours = result.eval_losses[-1][1]
    assert abs(loss - ours) <= TOL * ours, (loss, ours)
