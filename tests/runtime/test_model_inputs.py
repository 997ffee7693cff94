"""The model folder and adapter inputs, found by fuzzing: a plan run after its model folder changed, config.json
fields the builder cannot honour, weights the config does not use, and malformed PEFT adapters."""

from __future__ import annotations

import json
import shutil

import pytest

from surogate.cli import main
from surogate.compiler.models.resolve import plan_model_changes, resolve_model
from surogate.compiler.planfile import read_plan
from tests.runtime.helpers import make_cfg, save_model, write_text_data, write_yaml, yaml_cfg


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("model_inputs")
    save_model(root / "model", "qwen3")
    save_model(root / "model3", "qwen3", num_hidden_layers=3)
    write_text_data(root / "train.jsonl", rows=16)
    return root


def _edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


# ------------------------------------------------------------------------------------------ plan vs folder

def test_run_refuses_a_plan_whose_model_folder_changed(root, tmp_path, capsys):
    """Found by fuzzing: `surogate run B.bin` after the folder became a 3-layer model trained the plan's 2 layers
    and exported them under a 3-layer config.json, exit 0."""
    model = tmp_path / "model"
    shutil.copytree(root / "model", model)
    cfg_yaml = write_yaml(tmp_path / "cfg.yaml", yaml_cfg(model, root / "train.jsonl", tmp_path / "out", max_steps=1))
    plan_file = tmp_path / "B.bin"
    assert main(["plan", str(cfg_yaml), "-o", str(plan_file)]) == 0
    planned = read_plan(plan_file).meta["spec"]
    assert planned["weights_fingerprint"]

    # re-saved by another transformers (version, dtype spelling, use_cache): the same model
    _edit_config(model, transformers_version="0.0.1", use_cache=False)
    assert plan_model_changes(planned, resolve_model(make_cfg(model))) == []

    # a 3-layer folder in its place
    shutil.rmtree(model)
    shutil.copytree(root / "model3", model)
    capsys.readouterr()
    assert main(["run", str(plan_file)]) == 2
    err = capsys.readouterr().err
    assert f"model: the model folder {model} changed since the plan {plan_file} was made" in err, err
    assert "num_hidden_layers 2 -> 3" in err and "re-run `surogate plan`" in err
    assert not (tmp_path / "out").exists()  # refused before anything was trained or written

    # the old config.json beside other weights: the weights' fingerprint differs
    shutil.copy(root / "model" / "config.json", model / "config.json")
    assert main(["run", str(plan_file)]) == 2
    err = capsys.readouterr().err
    assert "the weight tensors' names, shapes or dtypes" in err and "config.json" not in err.split("(", 1)[1], err
    # from_scratch does not read the weights: only the config counts
    assert plan_model_changes(planned, resolve_model(make_cfg(model)), weights=False) == []


def test_plan_without_weights_is_checked_by_config(root, tmp_path):
    """A plan made before the weights were downloaded (config.json only) has no weights fingerprint: its config
    is still compared."""
    model = tmp_path / "model"
    model.mkdir()
    shutil.copy(root / "model" / "config.json", model / "config.json")
    spec = resolve_model(make_cfg(model))
    assert spec.weights_fingerprint is None
    planned = json.loads(json.dumps({"family": spec.family, "dtype": spec.dtype, "hf_config": spec.hf_config,
                                     "weights_fingerprint": None}))
    for f in (root / "model").glob("*.safetensors"):
        shutil.copy(f, model / f.name)
    assert plan_model_changes(planned, resolve_model(make_cfg(model))) == []
    _edit_config(model, intermediate_size=64)
    assert plan_model_changes(planned, resolve_model(make_cfg(model))) == ["config.json intermediate_size 48 -> 64"]


# ------------------------------------------------------------------------------------ config.json fields

@pytest.mark.parametrize("changes, match", [
    ({"hidden_act": "foo"}, r"hidden_act 'foo' is not supported \(supported: silu, swish\)"),
    ({"hidden_act": "gelu"}, r"hidden_act 'gelu' is not supported"),
    ({"max_position_embeddings": 0}, r"max_position_embeddings must be a positive integer, got 0"),
    ({"max_position_embeddings": -5}, r"max_position_embeddings must be a positive integer, got -5"),
    ({"dtype": "int8"}, r"dtype 'int8' is not a floating-point dtype Surogate loads"),
    ({"torch_dtype": "junk"}, r"torch_dtype 'junk' is not a floating-point dtype Surogate loads"),
    ({"head_dim": 15}, r"head_dim is 15, which must be even: rotary position embeddings rotate pairs"),
    ({"head_dim": None, "hidden_size": 36}, r"the head size hidden_size / num_attention_heads is 9, which must be even"),
    ({"partial_rotary_factor": 0.5}, r"partial_rotary_factor 0.5 is not supported"),
    ({"use_sliding_window": True, "sliding_window": 8}, r"sliding-window attention .* is not supported"),
    ({"layer_types": ["sliding_attention", "full_attention"]}, r"sliding-window attention"),
    # sizes no machine holds: 1e20 overflowed the planner, head_dim 2**23 made a plan with an 8M-entry rope table
    # in its attrs, 2**30 x 2**31 sizes overflowed the arena offsets (int64)
    ({"hidden_size": 10**20}, r"hidden_size is 100000000000000000000, larger than any model dimension"),
    ({"head_dim": 2**23}, r"head_dim is 8388608, larger than Surogate supports \(512\)"),
    ({"hidden_size": 2**30, "intermediate_size": 2**31 - 1, "num_attention_heads": 2**21, "num_key_value_heads": 2**21,
      "head_dim": None}, r"the architecture describes a model of about 2.31e\+19 parameters, beyond what Surogate plans"),
])
def test_config_fields_the_builder_cannot_honour_are_errors(root, tmp_path, changes, match):
    """Found by fuzzing: `hidden_act: foo` trained as SiLU, a zero max_position_embeddings and an int8 / junk dtype
    were accepted (the dtype silently became bf16), head_dim 15 failed in the tokenizer loader with its reason cut
    off."""
    from surogate.errors import UserError

    model = tmp_path / "m"
    shutil.copytree(root / "model", model)
    _edit_config(model, **changes)
    with pytest.raises(UserError, match=rf"model: config.json of .*: {match}"):
        resolve_model(make_cfg(model))


def test_torch_dtype_spellings_still_resolve(root, tmp_path):
    model = tmp_path / "m"
    shutil.copytree(root / "model", model)
    for value, dtype in (("torch.float16", "fp16"), ("bfloat16", "bf16"), ("float32", "fp32")):
        _edit_config(model, dtype=value)
        assert resolve_model(make_cfg(model, torch_dtype=None)).dtype == dtype


def test_tokenizer_error_keeps_its_reason(monkeypatch, tmp_path):
    """The tokenizer loader printed only the first line of transformers' message ("Class validation error for
    validator 'validate_rope':"), cutting off the reason on the next line."""
    from types import SimpleNamespace

    import transformers

    from surogate.errors import UserError
    from surogate.runtime.data import load_tokenizer

    def broken(*_a, **_k):
        raise ValueError("Class validation error for validator 'validate_rope':\n    ValueError: RoPE requires an "
                         "even rotary dimension")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", broken)
    with pytest.raises(UserError, match=r"validate_rope': ValueError: RoPE requires an even rotary dimension"):
        load_tokenizer(SimpleNamespace(model=str(tmp_path)))


# ------------------------------------------------------------------------------ weights the model does not use

def _with_extra_tensors(src, dst, extra):
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    (weights,) = dst.glob("*.safetensors")
    tensors = load_file(weights)
    tensors.update(extra)
    save_file(tensors, weights, metadata={"format": "pt"})
    return dst


def test_weights_of_layers_beyond_the_config_are_an_error(root, tmp_path):
    """Found by fuzzing: a 3-layer folder whose config.json says 2 layers trained (and exported) 2 layers, silently."""
    from surogate.compiler.pipeline import compile_plan
    from surogate.errors import UserError
    from surogate.runtime.reference import load_weights

    model = tmp_path / "m"
    shutil.copytree(root / "model3", model)
    _edit_config(model, num_hidden_layers=2, layer_types=["full_attention"] * 2)
    cfg = make_cfg(model)
    with pytest.raises(UserError, match=r"model: .* holds weights of layer\(s\) 2 \(e.g. 'model.layers.2\..*'\), but "
                                        r"its config.json says num_hidden_layers 2"):
        load_weights(compile_plan(cfg), model)


def test_other_unused_tensors_are_a_note(root, tmp_path):
    import torch

    from surogate.compiler.pipeline import compile_plan
    from surogate.runtime.reference import load_weights

    model = _with_extra_tensors(root / "model", tmp_path / "m", {
        "model.layers.0.mlp.gate_proj.bias": torch.zeros(48), "vision_tower.proj.weight": torch.zeros(2, 2),
        "model.layers.1.self_attn.rotary_emb.inv_freq": torch.zeros(4)})  # a buffer old checkpoints carry: no note
    plan = compile_plan(make_cfg(model))
    notes: list[str] = []
    weights = load_weights(plan, model, notes=notes)
    assert weights and notes == [f"model: 2 tensor(s) in {model} are not weights of the model its config.json "
                                 "describes and were not loaded: 'model.layers.0.mlp.gate_proj.bias', "
                                 "'vision_tower.proj.weight'"]
    notes.clear()
    load_weights(plan, root / "model", notes=notes)
    assert notes == []  # a folder that matches its config: nothing to say


def test_unused_tensor_note_reaches_the_run(root, tmp_path, capsys):
    import torch

    model = _with_extra_tensors(root / "model", tmp_path / "m", {"extra.weight": torch.zeros(3)})
    cfg_yaml = write_yaml(tmp_path / "cfg.yaml", yaml_cfg(model, root / "train.jsonl", tmp_path / "out", max_steps=1))
    assert main(["sft", str(cfg_yaml)]) == 0
    out = capsys.readouterr()
    assert "are not weights of the model its config.json describes and were not loaded: 'extra.weight'" in \
        " ".join((out.out + out.err).split()), out.out


# ------------------------------------------------------------------------------------------------ adapter_path

def _peft_adapter(model_dir, out, **lora_kw):
    """A PEFT adapter of `model_dir` with every trainable tensor perturbed (LoRA B non-zero, modules_to_save and
    trained biases differing from the base), and PEFT's own `merge_and_unload` state dict."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], **lora_kw))
    with torch.no_grad():
        for _, p in peft_model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    peft_model.save_pretrained(out)
    return {k: v.clone() for k, v in peft_model.merge_and_unload().state_dict().items()}


@pytest.mark.parametrize("family, lora_kw", [
    ("qwen3", {"modules_to_save": ["lm_head", "embed_tokens"]}),
    ("qwen2", {"bias": "all"}),  # PEFT saves every trained bias (q/k/v), the targets' as `.base_layer.bias`
])
def test_adapter_whole_tensors_merge_as_peft_does(root, tmp_path, family, lora_kw):
    """Found by fuzzing: `modules_to_save` tensors of an adapter were dropped from the merge without a word."""
    import torch

    from surogate.compiler.pipeline import compile_plan
    from surogate.runtime.reference import load_weights
    from surogate.runtime.reference.weights import checkpoint_reader

    model = root / "model" if family == "qwen3" else save_model(tmp_path / "m", family)
    merged = _peft_adapter(model, tmp_path / "adapter", **lora_kw)
    assert checkpoint_reader(model, tmp_path / "adapter").replaced  # the adapter holds whole tensors
    plan = compile_plan(make_cfg(model, lora=True, lora_rank=4, adapter_path=str(tmp_path / "adapter")))
    ours = load_weights(plan, model, adapter_path=tmp_path / "adapter")
    compared = 0
    for name, t in plan.tensors.items():
        if name in ours and t.source in merged and "lora" not in t.attrs:
            torch.testing.assert_close(ours[name], merged[t.source], rtol=1e-6, atol=1e-6, msg=name)
            compared += 1
    assert compared == len(merged)


def _write_adapter(folder, tensors, **config):
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({f"base_model.model.{k}": v for k, v in tensors.items()}, folder / "adapter_model.safetensors")
    conf = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "bias": "none"}
    conf.update(config)
    (folder / "adapter_config.json").write_text(json.dumps({k: v for k, v in conf.items() if v is not _DROP}))
    return folder


_DROP = object()
Q = "model.layers.0.self_attn.q_proj"  # weight (32, 32) in the tiny models


def _lora(module=Q, a=(4, 32), b=(32, 4)):
    import torch

    return {f"{module}.lora_A.weight": torch.ones(a), f"{module}.lora_B.weight": torch.ones(b)}


@pytest.mark.parametrize("tensors, config, match", [
    ({}, {}, r"adapter_model.safetensors holds no tensors: there is nothing to merge"),
    (None, {"r": "8"}, r"adapter_config.json: r must be a positive integer, got '8'"),
    (None, {"r": 0}, r"adapter_config.json: r must be a positive integer, got 0"),
    (None, {"lora_alpha": _DROP}, r"adapter_config.json lacks lora_alpha"),
    (None, {"lora_alpha": "16"}, r"adapter_config.json: lora_alpha must be a positive number, got '16'"),
    (None, {"target_modules": 5}, r"adapter_config.json: target_modules must be a list of module names .*, got 5"),
    (None, {"target_modules": ["q_proj", 3]}, r"target_modules must be a list of module names"),
    (None, {"modules_to_save": "lm_head"}, r"modules_to_save must be a list of module names or null, got 'lm_head'"),
    (None, {"use_rslora": "yes"}, r"use_rslora must be true or false, got 'yes'"),
    (None, {"bias": "some"}, r"bias must be one of none, all, lora_only, got 'some'"),
    (None, {"peft_type": "IA3"}, r"has peft_type 'IA3'; only LORA can be merged"),
    (None, {"lora_bias": True}, r"uses LoRA biases \(lora_bias\), which merging does not support"),
    ({f"{Q}.lora_A.weight": "A"}, {}, rf"LoRA module '{Q}' has lora_A but no lora_B"),
    ({f"{Q}.lora_B.weight": "B"}, {}, rf"LoRA module '{Q}' has lora_B but no lora_A"),
    (_lora(b=(32, 3)), {}, rf"LoRA module '{Q}': A \(4, 32\) and B \(32, 3\) do not form B @ A"),
    (_lora(a=(2, 32), b=(32, 2)), {}, rf"LoRA module '{Q}' has rank 2, but .*adapter_config.json says r 4"),
    (_lora(a=(4, 31)), {}, rf"the LoRA update \(B @ A\) of '{Q}.weight' has shape \(32, 31\), the model's weight "
                           r"\(32, 32\)"),
    (_lora("model.layers.9.self_attn.q_proj"), {}, r"changes 'model.layers.9.self_attn.q_proj.weight', which the "
                                                   r"model in .* does not have"),
    ({"model.norm.weight": "norm"}, {}, r"holds 'base_model.model.model.norm.weight', which is neither a LoRA A/B "
                                        r"tensor nor a module of modules_to_save"),
    ({"model.norm.weight": "wide"}, {"modules_to_save": ["norm"]}, r"the tensor 'model.norm.weight' "
                                                                   r"\(modules_to_save\) has shape \(33,\)"),
])
def test_malformed_adapters_are_user_errors(root, tmp_path, tensors, config, match):
    """Found by fuzzing: wrong types in adapter_config.json, a lora_A without its lora_B and wrong shapes were
    tracebacks; an adapter without tensors merged as a silent no-op."""
    import torch

    from surogate.errors import UserError
    from surogate.runtime.reference.weights import checkpoint_reader

    stand_in = {"A": torch.ones(4, 32), "B": torch.ones(32, 4), "norm": torch.ones(32), "wide": torch.ones(33)}
    tensors = _lora() if tensors is None else {k: stand_in.get(v, v) if isinstance(v, str) else v
                                               for k, v in tensors.items()}
    adapter = _write_adapter(tmp_path / "adapter", tensors, **config)
    with pytest.raises(UserError, match=rf"adapter_path: .*{match}"):
        checkpoint_reader(root / "model", adapter)


def test_adapter_change_the_model_does_not_use_is_an_error(tmp_path):
    """A tied model's checkpoint may still hold lm_head.weight: an adapter's lm_head (modules_to_save) would be
    merged into a tensor the model never reads."""
    import torch
    from safetensors.torch import load_file, save_file

    from surogate.compiler.pipeline import compile_plan
    from surogate.errors import UserError
    from surogate.runtime.reference import load_weights

    model = save_model(tmp_path / "tied", "qwen3", tie=True)
    (weights,) = model.glob("*.safetensors")
    tensors = load_file(weights)
    save_file({**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"].clone()}, weights,
              metadata={"format": "pt"})
    adapter = _write_adapter(tmp_path / "adapter", {**_lora(), "lm_head.weight": torch.ones(96, 32)},
                             modules_to_save=["lm_head"])
    plan = compile_plan(make_cfg(model, lora=True, adapter_path=str(adapter)))
    with pytest.raises(UserError, match=r"adapter_path: the adapter changes 'lm_head.weight', which the model in .* "
                                        r"does not use \(with tied embeddings the head is the embedding\)"):
        load_weights(plan, model, adapter_path=adapter)


def test_plan_checks_an_adapter_it_can_read(root, tmp_path, capsys):
    """Found by a helper: a malformed adapter was found only when a run loaded the weights; `plan` reads it when the
    folder is there (an adapter folder not here may be meant for the machine that runs the plan)."""
    from surogate.cli import main

    bad = _write_adapter(tmp_path / "bad", _lora(), r="four")
    cfg = tmp_path / "c.yaml"
    for adapter, code in ((bad, 2), (tmp_path / "elsewhere", 0)):
        cfg.write_text(f"model: {root / 'model'}\nsequence_len: 16\nlora: true\nadapter_path: {adapter}\n")
        assert main(["plan", str(cfg)]) == code
        err = capsys.readouterr().err
        assert ("adapter_path" in err and "r must be a positive integer" in err) == (code == 2), err
