"""Exports are loaded back by transformers / peft and give the reference model's logits."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from surogate.errors import UserError
from surogate.runtime.export import (
    export_for_config,
    export_hf_model,
    export_merged_model,
    export_peft_adapter,
    lora_modules,
    merge_lora,
    read_model_config,
)
from surogate.runtime.peft_adapter import load_peft_adapter
from surogate.schema import config_from_dict
from tests.runtime_support.helpers import batch, save_tiny_source, tiny_model

ALPHA = 16
RANK = 4


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _reference(family: str, tied: bool, targets):
    """Base weights (HF names), LoRA weights (plain names) and the peft reference model, B non-zero."""
    base_model = tiny_model(family, tied)
    base = {k: v.clone() for k, v in base_model.state_dict().items()}
    peft_model = get_peft_model(base_model, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.05,
                                                       target_modules=targets, task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(7)
    lora = {}
    for name, p in peft_model.named_parameters():
        if "lora_" in name:
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)  # B non-zero: the adapter matters
            plain = name.removeprefix("base_model.model.").replace(".default.weight", ".weight")
            lora[plain] = p.detach().clone()
    return base, lora, peft_model.eval()


@pytest.mark.parametrize("family,tied", [("qwen3", True), ("llama", False)])
def test_peft_adapter_loads_and_matches(tmp_path, family, tied):
    base, lora, ref = _reference(family, tied, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                 "down_proj"])
    source = save_tiny_source(tiny_model(family, tied), tmp_path / "source")
    out = export_peft_adapter(tmp_path / "adapter", lora, lora_alpha=ALPHA, lora_dropout=0.05,
                              base_model_name_or_path=str(source), base_names=base)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["r"] == RANK
    assert cfg["lora_alpha"] == ALPHA and cfg["lora_dropout"] == 0.05 and cfg["base_model_name_or_path"] == str(source)
    assert sorted(cfg["target_modules"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                     "down_proj"])
    keys = load_file(out / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(source), out).eval()
    ids = batch()
    expected = _logits(ref, ids)
    assert not torch.allclose(expected, _logits(tiny_model(family, tied), ids), atol=1e-3)  # LoRA changes output
    torch.testing.assert_close(_logits(loaded, ids), expected, rtol=0, atol=0)


def test_partial_coverage_uses_exact_module_names(tmp_path):
    base, lora, ref = _reference("qwen3", True, ["model.layers.1.self_attn.q_proj"])
    source = save_tiny_source(tiny_model("qwen3", True), tmp_path / "source")
    out = export_peft_adapter(tmp_path / "adapter", lora, lora_alpha=ALPHA, base_names=base)
    assert json.loads((out / "adapter_config.json").read_text())["target_modules"] == ["model.layers.1.self_attn.q_proj"]
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(source), out).eval()
    # only layer 1 got an adapter: a short name would have added (zero) adapters to layer 0 as well
    assert not hasattr(loaded.base_model.model.model.layers[0].self_attn.q_proj, "lora_A")
    torch.testing.assert_close(_logits(loaded, batch()), _logits(ref, batch()), rtol=0, atol=0)


@pytest.mark.parametrize("family,tied", [("qwen3", True), ("llama", False)])
def test_merged_model_loads_and_matches(tmp_path, family, tied):
    base, lora, ref = _reference(family, tied, ["q_proj", "v_proj", "down_proj"])
    source = save_tiny_source(tiny_model(family, tied), tmp_path / "source")
    out = export_merged_model(tmp_path / "merged", base, lora, read_model_config(source), source, lora_alpha=ALPHA)
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(_logits(merged, batch()), _logits(ref, batch()), rtol=1e-5, atol=1e-5)
    # peft's own merge agrees with ours weight by weight
    peft_merged = ref.merge_and_unload().state_dict()
    ours = merge_lora(base, lora, lora_alpha=ALPHA)
    for key in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        torch.testing.assert_close(ours[key], peft_merged[key], rtol=1e-6, atol=1e-6)
    assert AutoTokenizer.from_pretrained(out).eos_token == "</s>"


@pytest.mark.parametrize("family,tied", [("qwen3", True), ("llama", False)])
def test_full_model_round_trip(tmp_path, family, tied):
    model = tiny_model(family, tied, seed=3)
    source = save_tiny_source(tiny_model(family, tied), tmp_path / "source")
    tensors = dict(model.state_dict())  # tied: lm_head.weight and the embedding are one tensor
    out = export_hf_model(tmp_path / "full", tensors, read_model_config(source), source)
    files = sorted(p.name for p in out.iterdir())
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= set(files)
    assert ("lm_head.weight" in load_file(out / "model.safetensors")) is (not tied)
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(_logits(loaded, batch()), _logits(model, batch()), rtol=0, atol=0)
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2


def test_sharded_bf16_export_without_source(tmp_path):
    model = tiny_model("llama", False, seed=4).to(torch.bfloat16)
    cfg = model.config.to_dict()
    out = export_hf_model(tmp_path / "full", model.state_dict(), cfg, None, max_shard_bytes=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert loaded.dtype == torch.bfloat16
    # weights compared bitwise (logits would differ: `.to(bfloat16)` also casts the RoPE buffers)
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert set(ours) == set(theirs)
    for k in ours:
        assert ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]), k


def test_failed_export_leaves_previous_output(tmp_path):
    model = tiny_model("llama", False)
    cfg = model.config.to_dict()
    out = export_hf_model(tmp_path / "full", model.state_dict(), cfg)
    before = sorted(p.name for p in out.iterdir())
    broken = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    with pytest.raises(UserError, match="lm_head.weight"):
        export_hf_model(tmp_path / "full", broken, cfg)
    assert sorted(p.name for p in out.iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]  # no temp folder left


def test_bad_lora_inputs():
    with pytest.raises(ValueError, match="no lora_B"):
        lora_modules({"m.lora_A.weight": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match="do not form"):
        lora_modules({"m.lora_A.weight": torch.zeros(2, 3), "m.lora_B.weight": torch.zeros(4, 3)})
    with pytest.raises(ValueError, match="no base weight"):
        merge_lora({}, {"m.lora_A.weight": torch.zeros(2, 3), "m.lora_B.weight": torch.zeros(4, 2)}, lora_alpha=1)


def test_missing_config_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="config.json: not found"):
        read_model_config(tmp_path)


def test_peft_adapter_read_back_and_merged(tmp_path):
    """`adapter_path`: an adapter written by peft itself is read and merged to the peft model's logits."""
    base, _, ref = _reference("qwen3", True, ["q_proj", "up_proj"])
    ref.save_pretrained(tmp_path / "peft_written")
    adapter = load_peft_adapter(tmp_path / "peft_written")
    assert "model.layers.1.mlp.up_proj.lora_B.weight" in adapter.lora and adapter.lora_alpha == ALPHA
    assert not adapter.replaced
    merged = merge_lora(base, adapter.lora, lora_alpha=adapter.lora_alpha, use_rslora=adapter.use_rslora)
    model = tiny_model("qwen3", True)
    model.load_state_dict(merged)
    torch.testing.assert_close(_logits(model, batch()), _logits(ref, batch()), rtol=1e-5, atol=1e-5)


def test_rslora_scale_matches_peft(tmp_path):
    base_model = tiny_model("llama", False)
    base = {k: v.clone() for k, v in base_model.state_dict().items()}
    ref = get_peft_model(base_model, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["v_proj"],
                                                use_rslora=True, task_type="CAUSAL_LM")).eval()
    for name, p in ref.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.3)
    ref.save_pretrained(tmp_path / "rs")
    adapter = load_peft_adapter(tmp_path / "rs")
    model = tiny_model("llama", False)
    model.load_state_dict(merge_lora(base, adapter.lora, lora_alpha=ALPHA, use_rslora=adapter.use_rslora))
    torch.testing.assert_close(_logits(model, batch()), _logits(ref, batch()), rtol=1e-5, atol=1e-5)


def test_bad_adapter_folders_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="adapter_config.json not found"):
        load_peft_adapter(tmp_path)
    export_peft_adapter(tmp_path / "a", {"m.lora_A.weight": torch.zeros(2, 3), "m.lora_B.weight": torch.zeros(4, 2)},
                        lora_alpha=4)
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(cfg | {"use_dora": True}))
    with pytest.raises(UserError, match="use_dora"):
        load_peft_adapter(tmp_path / "a")


def test_export_for_config_layout(tmp_path):
    base, lora, ref = _reference("qwen3", True, ["q_proj"])
    source = save_tiny_source(tiny_model("qwen3", True), tmp_path / "source")
    cfg = config_from_dict({"model": str(source), "output_dir": str(tmp_path / "out"), "lora": True,
                            "lora_rank": RANK, "lora_alpha": ALPHA, "merge_adapter": True})
    written = export_for_config(cfg, base, lora, source)
    assert set(written) == {"adapter", "merged"}
    assert json.loads((written["adapter"] / "adapter_config.json").read_text())["r"] == RANK
    merged = AutoModelForCausalLM.from_pretrained(written["merged"]).eval()
    torch.testing.assert_close(_logits(merged, batch()), _logits(ref, batch()), rtol=1e-5, atol=1e-5)
    full_cfg = config_from_dict({"model": str(source), "output_dir": str(tmp_path / "full"), "lora": False})
    assert set(export_for_config(full_cfg, base, None, source)) == {"model"}
    assert (tmp_path / "full" / "model" / "tokenizer.json").is_file()


def test_tokenizer_and_training_template_are_written_inside_the_atomic_folder(tmp_path):
    """Without a source folder the tokenizer writes its own files; the run's chat template replaces the
    tokenizer's. Both inside the folder's atomic write: a failed export leaves neither behind."""
    model = tiny_model("llama", False)
    tok = AutoTokenizer.from_pretrained(save_tiny_source(model, tmp_path / "src"))
    tok.chat_template = "{{ 'theirs' }}"
    ours = "{% for m in messages %}{{ m.content }}{% endfor %}"
    out = export_hf_model(tmp_path / "full", model.state_dict(), model.config.to_dict(), tokenizer=tok,
                          chat_template=ours)
    assert (out / "chat_template.jinja").read_text() == ours
    assert "chat_template" not in json.loads((out / "tokenizer_config.json").read_text())
    assert AutoTokenizer.from_pretrained(out).apply_chat_template([{"role": "user", "content": "hi"}],
                                                                  tokenize=False) == "hi"
    broken = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    with pytest.raises(UserError, match="lm_head.weight"):
        export_hf_model(tmp_path / "again", broken, model.config.to_dict(), tokenizer=tok, chat_template=ours)
    assert not (tmp_path / "again").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["full", "src"]
