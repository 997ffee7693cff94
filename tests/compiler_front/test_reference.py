"""The reference interpreter's weight loading (sharded checkpoints), dtype handling and dropout."""

from __future__ import annotations

import pytest
import torch

from surogate.errors import UserError
from surogate.runtime.reference import batch_inputs, gradients, load_weights, run_graph
from tests.compiler_front.helpers import compile_front, hf_config, make_cfg, random_batch, rel_err, run_ours


def test_sharded_checkpoint_loads_like_single_file(tmp_path, tiny_models):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    graph = compile_front(make_cfg(sharded))
    a, b = load_weights(graph, sharded), load_weights(graph, tiny_models["llama"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_missing_weight_is_a_user_error(tmp_path, tiny_models):
    from safetensors.torch import load_file, save_file

    d = tmp_path / "broken"
    d.mkdir()
    (d / "config.json").write_text((tiny_models["qwen3"] / "config.json").read_text())
    state = load_file(tiny_models["qwen3"] / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, d / "model.safetensors")
    with pytest.raises(UserError, match="model.layers.1.mlp.up_proj.weight"):
        load_weights(compile_front(make_cfg(d)), d)


def test_bf16_model_runs_close_to_transformers_bf16(tmp_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_config("qwen3"), dtype=torch.bfloat16)
    d = tmp_path / "bf16"
    model.save_pretrained(d)
    graph = compile_front(make_cfg(d))
    assert graph.meta["model_dtype"] == "bf16"
    ids, labels = random_batch(101, 2, 16)
    loss, grads = run_ours(graph, d, ids, labels)
    assert all(g.dtype == torch.bfloat16 for g in grads.values())
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    assert loss == pytest.approx(out.loss.item(), rel=1e-2)
    errs = [rel_err(grads[n], p.grad) for n, p in model.named_parameters()]
    assert max(errs) < 0.05


def test_lora_dropout_is_applied_and_recompute_reproduces_it(tiny_models):
    d = tiny_models["qwen3"]
    ids, labels = random_batch(101, 2, 16)
    runs = {}
    for p, rc in ((0.0, False), (0.3, False), (0.3, True)):
        graph = compile_front(make_cfg(d, lora=True, lora_dropout=p, recompute=rc))
        w = load_weights(graph, d, lora_seed=2)
        for k in [k for k in w if k.endswith("lora_B.weight")]:
            w[k] = torch.randn(w[k].shape, generator=torch.Generator().manual_seed(len(k))) * 0.2
        runs[(p, rc)] = run_ours(graph, d, ids, labels, weights=w)
    assert runs[(0.3, False)][0] != runs[(0.0, False)][0]
    (l1, g1), (l2, g2) = runs[(0.3, False)], runs[(0.3, True)]
    assert l1 == l2 and all(torch.equal(g1[k], g2[k]) for k in g1)


def test_gradients_accumulate_across_micro_steps(tiny_models):
    d = tiny_models["llama"]
    graph = compile_front(make_cfg(d, recompute=True))
    values = load_weights(graph, d)
    ids, labels = random_batch(101, 2, 16)
    one = {}
    for step in range(2):
        values.update(batch_inputs(graph, ids, labels))
        run_graph(graph, values, step=step)
        if step == 0:
            one = {k: v.clone() for k, v in gradients(graph, values).items()}
    two = gradients(graph, values)
    assert all(torch.allclose(two[k], 2 * one[k], rtol=1e-6, atol=1e-9) for k in one)


def test_from_scratch_init_rules():
    graph = compile_front(make_cfg("Qwen/Qwen3-0.6B", from_scratch=True, init_projections_to_zero=True,
                                   sequence_len=8), backward=False)
    rules = {n: t.attrs["init"] for n, t in graph.tensors.items() if "init" in t.attrs}
    assert rules["model.layers.3.input_layernorm.weight"] == "ones"
    assert rules["model.layers.3.self_attn.o_proj.weight"] == "zeros"
    assert rules["model.layers.3.mlp.down_proj.weight"] == "zeros"
    assert rules["model.layers.3.mlp.up_proj.weight"] == "normal"


@pytest.mark.parametrize("zero_projections", [True, False])
def test_from_scratch_weights_follow_the_builders_init_marks(tiny_models, zero_projections):
    """The runtime's from-scratch initialiser (HF `from_config`, the one implementation) on a front graph:
    what the builder marks `init: zeros` (biases; o_proj / down_proj with init_projections_to_zero) is zero,
    the rest is HF's own init, and the model trains from it."""
    from transformers import AutoModelForCausalLM

    from surogate.runtime.reference.dtypes import TORCH_DTYPES
    from surogate.runtime.weights import initial_weights

    cfg = make_cfg(tiny_models["qwen2"], from_scratch=True, init_projections_to_zero=zero_projections, train_seed=3)
    graph = compile_front(cfg)
    config = hf_config("qwen2")
    w = initial_weights(graph, cfg, None, config.to_dict())
    marks = {graph.tensors[n].source: graph.tensors[n].attrs.get("init") for n in w}
    zeros = {src for src, mark in marks.items() if mark == "zeros"}
    assert "model.layers.1.self_attn.q_proj.bias" in zeros
    projections = {src for src in marks if src.endswith(("o_proj.weight", "down_proj.weight"))}
    assert len(projections) == 2 * config.num_hidden_layers
    assert projections <= zeros if zero_projections else not projections & zeros
    torch.manual_seed(3)
    ref = dict(AutoModelForCausalLM.from_config(config, dtype=torch.float32).state_dict())
    for name, value in w.items():
        src = graph.tensors[name].source
        if src in zeros:
            assert not value.any(), src
        else:
            assert torch.equal(value, ref[src]), src
    assert torch.equal(w["model.norm.weight"], torch.ones(config.hidden_size))  # marked "ones"; HF's init too
    ids, labels = random_batch(config.vocab_size, 2, 16)
    values = {n: v.to(TORCH_DTYPES[graph.tensors[n].dtype]) for n, v in w.items()} | batch_inputs(graph, ids, labels)
    run_graph(graph, values)
    assert abs(float(values["loss"]) - torch.log(torch.tensor(float(config.vocab_size))).item()) < 0.1  # ~uniform
    assert gradients(graph, values)["model.layers.0.self_attn.o_proj.weight"].abs().sum() > 0


def test_adapter_path_is_merged_like_peft(tmp_path, tiny_models):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    d = tiny_models["qwen3"]
    torch.manual_seed(5)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32),
                                LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "down_proj"],
                                           init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    merged = {n: p for n, p in peft_model.merge_and_unload().named_parameters()}
    for qlora in (False, True):
        graph = compile_front(make_cfg(d, lora=True, qlora_fp8=qlora, qlora_block_size=64))
        w = load_weights(graph, d, adapter_path=tmp_path / "adapter")
        if not qlora:
            for name in ("model.layers.1.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight",
                         "model.layers.0.mlp.up_proj.weight"):
                assert torch.allclose(w[name], merged[name], atol=1e-6), name
        else:  # merged before quantization: dequantized weights track the merged ones
            from surogate.runtime.reference.quant import dequantize

            name = "model.layers.1.self_attn.q_proj.weight"
            deq = dequantize("fp8_block", [w[f"{name}.q"], w[f"{name}.scale"]], (64, 64), 64)
            assert rel_err(deq, merged[name]) < 0.05


def test_bad_adapter_path_is_a_user_error(tmp_path, tiny_models):
    graph = compile_front(make_cfg(tiny_models["qwen3"], lora=True), backward=False)
    with pytest.raises(UserError, match="adapter_path"):
        load_weights(graph, tiny_models["qwen3"], adapter_path=tmp_path)
