"""Model resolution, presets and graph builders (parameter counts vs transformers on `meta`)."""

from __future__ import annotations

import json

import pytest
import torch

from surogate.compiler.ir import Role
from surogate.compiler.models import PRESETS, build_forward_graph, find_preset, resolve_model
from surogate.compiler.models.rope import inv_freq
from surogate.errors import UserError
from surogate.schema import config_from_dict
from tests.compiler_front.helpers import make_cfg


def _weights(graph):
    return {t.source: t for t in graph.tensors.values()
            if t.role in (Role.FROZEN_WEIGHT, Role.TRAINABLE_WEIGHT) and t.source}


def test_qwen3_06b_preset_lora_r16_counts():
    from surogate.compiler.passes.lora import inject_lora

    cfg = config_from_dict({"model": "Qwen/Qwen3-0.6B", "lora": True, "lora_rank": 16, "sequence_len": 128,
                            "datasets": [{"path": "data.jsonl", "type": "text"}]})
    spec = resolve_model(cfg)
    assert spec.preset == "Qwen/Qwen3-0.6B" and spec.source_dir is None and spec.dtype == "bf16"
    graph = inject_lora(build_forward_graph(spec, cfg), cfg)
    frozen = [t for t in graph.tensors.values() if t.role == Role.FROZEN_WEIGHT]
    trainable = [t for t in graph.tensors.values() if t.role == Role.TRAINABLE_WEIGHT]
    assert sum(t.numel for t in frozen) == 596_049_920 == spec.param_count()
    assert sum(t.numel for t in trainable) == 10_092_544 == spec.lora_param_count(16)
    assert sum(t.nbytes for t in frozen) == 2 * 596_049_920
    assert all(t.dtype == "fp32" and "lora" in t.attrs for t in trainable)


def _meta_model(conf_dict):
    from transformers import AutoConfig, AutoModelForCausalLM

    conf = AutoConfig.for_model(**{k: v for k, v in conf_dict.items() if k != "architectures"})
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(conf)


@pytest.mark.parametrize("model_id", sorted(PRESETS))
def test_preset_graph_matches_transformers_meta_model(model_id):
    """Every HF parameter has a graph weight with that checkpoint name and shape, and nothing else exists."""
    cfg = make_cfg(model_id, sequence_len=64, per_device_train_batch_size=1)
    spec = resolve_model(cfg)
    graph = build_forward_graph(spec, cfg)
    hf = {n: tuple(p.shape) for n, p in _meta_model(find_preset(model_id)[1]).named_parameters()}
    ours = {name: t.shape for name, t in _weights(graph).items()}
    assert ours == hf
    assert spec.param_count() == sum(torch.Size(s).numel() for s in hf.values())


def test_qwen3_06b_lora_count_matches_peft_on_meta():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_meta_model(find_preset("Qwen/Qwen3-0.6B")[1]),
                           LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                           "gate_proj", "up_proj", "down_proj"]))
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == 10_092_544 and total - trainable == 596_049_920


def test_local_directory_resolves_with_dtype_and_family(tiny_models):
    spec = resolve_model(make_cfg(tiny_models["qwen2"]))
    assert spec.family == "qwen2" and spec.dtype == "fp32" and spec.source_dir == tiny_models["qwen2"]
    assert spec.qkv_bias and not spec.qk_norm
    assert resolve_model(make_cfg(tiny_models["qwen2"], torch_dtype="bfloat16")).dtype == "bf16"


def test_prequantized_checkpoint_is_refused_by_name(tiny_models, tmp_path):
    import json
    import shutil

    d = tmp_path / "fp8-model"
    shutil.copytree(tiny_models["qwen2"], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=r"model: .* is a pre-quantized checkpoint .*quant_method 'fp8'.*qlora_bnb"):
        resolve_model(make_cfg(str(d)))


def test_hf_cache_is_used_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    snap = tmp_path / "models--acme--tiny" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (tmp_path / "models--acme--tiny" / "refs").mkdir()
    (tmp_path / "models--acme--tiny" / "refs" / "main").write_text("abc123")
    conf = dict(find_preset("Qwen/Qwen2.5-0.5B")[1], num_hidden_layers=3)
    (snap / "config.json").write_text(json.dumps(conf))
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path))
    spec = resolve_model(make_cfg("acme/tiny"))
    assert spec.num_layers == 3 and spec.source_dir == snap and spec.preset is None


def test_unknown_hub_id_says_what_to_do():
    with pytest.raises(UserError, match=r"model: 'nobody/nothing-7B'.*huggingface-cli download"):
        resolve_model(make_cfg("nobody/nothing-7B"))


def test_missing_directory_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        resolve_model(make_cfg(str(tmp_path / "nope")))


@pytest.mark.parametrize("model_type,ok", [("qwen", True), ("qwen3", True), ("llama", False), ("qwen2", False)])
def test_model_type_override_is_validated(model_type, ok):
    cfg = make_cfg("Qwen/Qwen3-0.6B", model_type=model_type)
    if ok:
        assert resolve_model(cfg).family == "qwen3"
    else:
        with pytest.raises(UserError, match="model_type"):
            resolve_model(cfg)


def test_model_type_names_family_of_unrecognised_config(tmp_path):
    conf = dict(find_preset("meta-llama/Llama-3.2-1B")[1], model_type="my_llama", architectures=["X"])
    (tmp_path / "config.json").write_text(json.dumps(conf))
    with pytest.raises(UserError, match="does not support"):
        resolve_model(make_cfg(tmp_path))
    assert resolve_model(make_cfg(tmp_path, model_type="llama")).family == "llama"


def _hf_inv_freq(hf_config: dict, seq_len: int):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    conf = LlamaConfig(**{k: v for k, v in hf_config.items() if k not in ("architectures", "model_type")})
    emb = LlamaRotaryEmbedding(conf)
    x = torch.zeros(1, seq_len, 8)
    cos, _ = emb(x, torch.arange(seq_len)[None])
    return emb.inv_freq, emb.attention_scaling, cos


@pytest.mark.parametrize("scaling", ["linear", "yarn", "dynamic", "llama3",
                                     '{"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8192}'])
def test_rope_scaling_matches_transformers(scaling):
    cfg = make_cfg("Qwen/Qwen2.5-0.5B", model_type=None, rope_scaling=scaling, max_model_len=65536,
                   sequence_len=64)
    spec = resolve_model(cfg)
    assert spec.max_model_len == 65536
    assert spec.rope["rope_type"] == (json.loads(scaling)["type"] if scaling.startswith("{") else scaling)
    ours, scale = inv_freq(spec.hf_config, spec.head_dim, 64)
    ref, ref_scale, _ = _hf_inv_freq(spec.hf_config, 64)
    assert torch.allclose(torch.tensor(ours), ref.float(), rtol=1e-6)
    assert scale == pytest.approx(ref_scale)
    if scaling in ("linear", "yarn"):
        base, _ = inv_freq(resolve_model(make_cfg("Qwen/Qwen2.5-0.5B")).hf_config, spec.head_dim, 64)
        assert ours != base  # the override changed the frequencies


@pytest.mark.parametrize("scaling,max_len,match", [
    ("yarn", None, "needs max_model_len"),
    ("linear", 1024, "must exceed"),
    ("cubic", 65536, "unknown type"),
    ("{not json", None, "not valid JSON"),
    ('{"type": "yarn"}', None, "factor"),
])
def test_bad_rope_scaling_is_a_user_error(scaling, max_len, match):
    with pytest.raises(UserError, match=match):
        resolve_model(make_cfg("Qwen/Qwen2.5-0.5B", rope_scaling=scaling, max_model_len=max_len))


def test_sequence_len_beyond_model_length_is_rejected():
    with pytest.raises(UserError, match="sequence_len"):
        resolve_model(make_cfg("Qwen/Qwen2.5-0.5B", sequence_len=40000))
    assert resolve_model(make_cfg("Qwen/Qwen2.5-0.5B", sequence_len=40000, max_model_len=65536,
                                  rope_scaling="yarn")).max_model_len == 65536


def test_graph_meta_and_inputs():
    cfg = make_cfg("meta-llama/Llama-3.2-1B", sequence_len=32, per_device_train_batch_size=3)
    graph = build_forward_graph(resolve_model(cfg), cfg)
    graph.check()
    m = graph.meta
    assert (m["micro_batch"], m["seq_len"], m["num_layers"], m["labels_shifted"]) == (3, 32, 16, True)
    assert graph.tensors["cu_seqlens"].shape == (3 * 32 + 1,)
    assert all(graph.tensors[n].role == Role.INPUT for n in m["inputs"])
    assert graph.tensors["L0.out"].attrs["residual"] == "layer_input"
    assert "lm_head.weight" not in graph.tensors  # Llama 3.2 1B ties embeddings
    assert all(op.layer is not None for op in graph.ops() if op.name.startswith("L"))
    assert m["tied_embeddings"] and m["full_finetune"]  # make_cfg defaults to lora: false


def test_moe_graph_has_router_and_stacked_experts():
    cfg = make_cfg("Qwen/Qwen3-30B-A3B", sequence_len=16, per_device_train_batch_size=1)
    graph = build_forward_graph(resolve_model(cfg), cfg)
    kinds = [op.kind for op in graph.ops() if op.layer == 0]
    assert "moe_router" in kinds and "moe_experts" in kinds and "swiglu" not in kinds
    assert graph.tensors["model.layers.0.mlp.experts.gate_up_proj"].shape == (128, 2 * 768, 2048)
    assert graph.tensors["L0.router_indices"].shape == (16, 8)


@pytest.mark.parametrize("size", [0, 7, 1000])
def test_truncated_weights_file_is_a_user_error_naming_it(tiny_models, tmp_path, size):
    import shutil

    from surogate.runtime.reference.weights import checkpoint_reader

    d = tmp_path / "cut"
    shutil.copytree(tiny_models["qwen2"], d)
    (weights,) = d.glob("*.safetensors")
    with open(weights, "r+b") as fh:
        fh.truncate(size)
    with pytest.raises(UserError, match=rf"model: cannot read weights file {weights}"):
        checkpoint_reader(d)


def _edited_config(src, dst, **changes):
    import json
    import shutil

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("changes, match", [
    ({"hidden_size": -64}, r"hidden_size must be a positive integer, got -64"),
    ({"num_hidden_layers": "2"}, r"num_hidden_layers must be a positive integer, got '2'"),
    ({"num_attention_heads": 3}, r"num_attention_heads 3 is not a multiple of num_key_value_heads 2"),
    ({"num_key_value_heads": 3}, r"num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
    ({"head_dim": 0}, r"head_dim must be a positive integer, got 0"),
    ({"rms_norm_eps": "x"}, r"rms_norm_eps must be a positive number, got 'x'"),
])
def test_bad_architecture_fields_are_user_errors_naming_them(tiny_models, tmp_path, changes, match):
    """Found by feeding broken config.json files to `surogate sft`: each was a traceback from deep in the graph
    builder or the weight loader."""
    d = _edited_config(tiny_models["qwen3"], tmp_path / "m", **changes)
    with pytest.raises(UserError, match=rf"model: config.json of .*: {match}"):
        resolve_model(make_cfg(str(d)))


def test_rope_parameters_missing_a_field_are_a_user_error(tiny_models, tmp_path):
    from surogate.compiler.pipeline import compile_plan

    d = _edited_config(tiny_models["qwen3"], tmp_path / "m", rope_parameters={"rope_type": "yarn", "rope_theta": 1e4})
    with pytest.raises(UserError, match=r"config.json rope_parameters \(yarn\) lacks 'factor'"):
        compile_plan(make_cfg(str(d)))


def test_unreadable_safetensors_index_is_a_user_error(tiny_models, tmp_path):
    import shutil

    from surogate.runtime.reference.weights import checkpoint_reader

    d = tmp_path / "m"
    shutil.copytree(tiny_models["qwen2"], d)
    (d / "model.safetensors.index.json").write_text("{")
    with pytest.raises(UserError, match=r"model: .*model.safetensors.index.json is not a safetensors index"):
        checkpoint_reader(d)
