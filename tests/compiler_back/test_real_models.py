"""The back half on real model graphs (C1's builders + front-half passes): tiny Qwen3 configs written to
a temp dir, and the Qwen3-0.6B preset. The oracle for parameter counts is `transformers`."""

from __future__ import annotations

import json

import pytest

from surogate.compiler.ir import Role, Space
from surogate.compiler.pipeline import (
    BACK_HALF_OPTIONS,
    back_plan,
    compile_plan,
    front_graph,
    restore,
    snapshot,
)
from surogate.compiler.plan import Plan
from surogate.schema import config_from_dict

from .helpers import check_staging


def tiny_config(layers: int = 2, tie: bool = False) -> dict:
    return {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": layers, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 512, "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": tie, "torch_dtype": "bfloat16",
        "hidden_act": "silu", "attention_bias": False,
    }


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    def make(layers: int = 2, tie: bool = False) -> str:
        d = tmp_path_factory.mktemp(f"qwen3_{layers}_{int(tie)}")
        (d / "config.json").write_text(json.dumps(tiny_config(layers, tie)))
        return str(d)

    return make


def plan_for(model: str, **opts) -> Plan:
    return compile_plan(config_from_dict({"model": model, "sequence_len": 64, **opts}))


def dev(plan: Plan, what: str = "max_live") -> dict:
    return plan.memory["device"][what]


def persistent(plan: Plan, role: Role, space: Space = Space.DEVICE) -> int:
    return sum(t.nbytes for n, t in plan.tensors.items() if t.role is role and t.space is space
               and plan.lifetimes[n] is not None and not t.attrs.get("transient") and "staging_of" not in t.attrs)


@pytest.mark.parametrize("tie", [False, True])
def test_parameter_counts_match_transformers(tiny_dir, tie):
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(Qwen3Config(**tiny_config(2, tie)))
    expected = sum(p.numel() for p in hf.parameters())
    full = plan_for(tiny_dir(2, tie), lora=False)
    assert full.meta["parameters"] == {"total": expected, "trainable": expected, "adapter": 0}
    lora = plan_for(tiny_dir(2, tie), lora=True, lora_rank=4)
    # rank 4 adapters on q, k, v, o, gate, up, down of each layer: r * (in + out) each.
    h, i, q, kv = 64, 128, 4 * 16, 2 * 16
    adapters = 2 * 4 * ((h + q) + 2 * (h + kv) + (q + h) + 2 * (h + i) + (i + h))
    assert lora.meta["parameters"] == {"total": expected, "trainable": adapters, "adapter": adapters}


def test_recompute_lowers_activation_bytes(tiny_dir):
    d = tiny_dir(4)
    assert dev(plan_for(d, recompute=True, lora=False))["activations"] < dev(plan_for(d, recompute=False, lora=False))["activations"]


def test_offload_residual_with_recompute_is_depth_independent(tiny_dir):
    def acts(layers, **kw):
        return dev(plan_for(tiny_dir(layers), recompute=True, **kw))["activations"]

    assert acts(8) > acts(2)  # without offloading, checkpoints grow with depth
    shallow, deep = acts(2, offload_residual=True), acts(8, offload_residual=True)
    assert deep <= 1.05 * shallow


def test_lmhead_chunks_divide_the_logits_workspace(tiny_dir):
    def logits(n):
        plan = plan_for(tiny_dir(2), lmhead_chunks=n, per_device_train_batch_size=2)
        return max(plan.tensors[op.outputs[-1]].nbytes for op in plan.ops if op.kind.startswith("lm_head_ce"))

    assert logits(1) == 4 * logits(4) == 8 * logits(8)


@pytest.mark.parametrize("level,divided", [(1, {Role.OPTIMIZER_STATE}), (2, {Role.OPTIMIZER_STATE, Role.GRADIENT}),
                                           (3, {Role.OPTIMIZER_STATE, Role.GRADIENT, Role.TRAINABLE_WEIGHT})])
def test_zero_levels_divide_per_rank_bytes(tiny_dir, level, divided):
    one = plan_for(tiny_dir(2), lora=False)
    four = plan_for(tiny_dir(2), lora=False, gpus=4, zero_level=level)
    for role in (Role.OPTIMIZER_STATE, Role.GRADIENT, Role.TRAINABLE_WEIGHT):
        ratio = persistent(four, role) / persistent(one, role)
        if role in divided:
            assert abs(ratio - 0.25) < 0.02, role  # absmax blocks of 1-D norms round up per shard
        else:
            assert ratio == 1, role


@pytest.mark.parametrize("opts,role", [
    (dict(offload_optimizer=True), Role.OPTIMIZER_STATE),
    (dict(offload_master=True, master_dtype="fp32"), Role.MASTER_WEIGHT),
    (dict(offload_grads=True, shard_gradients=True), Role.GRADIENT),
])
def test_each_offload_moves_its_category_to_host(tiny_dir, opts, role):
    base_opts = {k: v for k, v in opts.items() if not k.startswith("offload")}
    on_device = plan_for(tiny_dir(2), lora=False, **base_opts)
    moved = plan_for(tiny_dir(2), lora=False, **opts)
    assert persistent(on_device, role) > 0
    assert persistent(moved, role) == 0
    assert persistent(moved, role, Space.HOST) == persistent(on_device, role)


@pytest.mark.parametrize("opts", [
    {},
    dict(lora=False),
    dict(lora=False, gpus=8, zero_level=3, master_dtype="fp32", max_grad_norm=1.0),
    dict(recompute=True, offload_residual=True, offload_optimizer=True, lmhead_chunks=4),
])
def test_arena_within_a_few_percent_of_lower_bound_on_qwen3_06b(opts):
    plan = compile_plan(config_from_dict({"model": "Qwen/Qwen3-0.6B", "sequence_len": 512, **opts}))
    for space in ("device", "host"):
        mem = plan.memory[space]
        assert mem["lower_bound_bytes"] <= mem["arena_bytes"] <= 1.03 * mem["lower_bound_bytes"]


def test_back_half_replan_from_front_snapshot_matches_full_compile(tiny_dir):
    base = {"model": tiny_dir(2), "sequence_len": 64, "lora": False}
    saved = snapshot(front_graph(config_from_dict(base)))
    changes = [dict(offload_optimizer=True), dict(zero_level=3, gpus=2), dict(optimizer="normuon"),
               dict(max_grad_norm=1.0), dict(offload_grads=True, shard_gradients=True),
               dict(offload_residual=True), dict(use_zero_copy=True, offload_optimizer=True)]
    for change in changes:
        cfg = config_from_dict({**base, **change})
        if set(change) <= BACK_HALF_OPTIONS:
            assert back_plan(restore(saved), cfg) == compile_plan(cfg), change


def test_qlora_bnb_frozen_weights_are_half_a_byte_per_param(tiny_dir):
    def quant_bytes(**kw):
        plan = plan_for(tiny_dir(2), lora=True, qlora_bnb=True, **kw)
        q = [t for t in plan.tensors.values() if t.role in (Role.QUANT_WEIGHT, Role.QUANT_SCALE)]
        if not q:
            pytest.skip("the precision pass does not emit QLoRA storage yet")
        weights = sum(t.numel for t in q if t.role is Role.QUANT_WEIGHT)
        data = sum(t.nbytes for t in q if t.role is Role.QUANT_WEIGHT)
        scales = sum(t.nbytes for t in q if t.role is Role.QUANT_SCALE)
        return weights, data, scales

    n, data, scales = quant_bytes(qlora_bnb_double_quant=False)
    assert data == n // 2
    assert scales == 4 * n // 64  # one fp32 absmax per 64-element block
    n2, data2, scales2 = quant_bytes(qlora_bnb_double_quant=True)
    assert (n2, data2) == (n, data) and scales2 < scales


def test_persistent_quants_keep_recipe_weight_quants_and_offload_quants_hosts_them(tiny_dir):
    def quants(**kw):
        plan = plan_for(tiny_dir(2), lora=False, recipe="fp8_hybrid", **kw)
        return plan, plan.memory["device"]["persistent"]["quantized_weights"], \
            plan.memory["host"]["persistent"]["quantized_weights"]

    _, requantized, _ = quants()
    kept_plan, kept, _ = quants(persistent_quants=True, shard_weights=True)
    # Every projection's fp8 weight copy (1 byte/param) now persists across steps.
    assert kept - requantized >= sum(t.numel for t in kept_plan.tensors.values()
                                     if t.role is Role.TRAINABLE_WEIGHT and t.layer is not None and t.numel > 64)
    assert any(op.attrs.get("cached") for op in kept_plan.ops if op.kind == "quantize")
    _, on_device, on_host = quants(persistent_quants=True, shard_weights=True, offload_quants=True)
    # what stays on the device is the fp8 amax histories (resident: their quantize ops update them in place)
    assert on_device == requantized > 0 and on_host == kept - requantized


def test_master_weights_from_precision_pass_are_sharded_with_optimizer_states(tiny_dir):
    one = plan_for(tiny_dir(2), lora=False, master_dtype="fp32")
    four = plan_for(tiny_dir(2), lora=False, master_dtype="fp32", gpus=4)
    assert persistent(one, Role.MASTER_WEIGHT) == 4 * one.meta["parameters"]["trainable"]
    assert abs(persistent(four, Role.MASTER_WEIGHT) / persistent(one, Role.MASTER_WEIGHT) - 0.25) < 0.02


@pytest.mark.parametrize("opts", [
    dict(offload_master=True, master_dtype="fp32"),
    dict(offload_master=True, offload_optimizer=True, master_dtype="fp32", gpus=2),
    dict(offload_grads=True, shard_gradients=True, offload_optimizer=True, max_grad_norm=1.0),
])
def test_optimizer_steps_touch_only_device_memory_unless_zero_copy(tiny_dir, opts):
    plan = plan_for(tiny_dir(2), lora=False, **opts)
    assert check_staging(plan) > 0
    steps = [op for op in plan.ops if op.kind.endswith("_step")]
    assert steps
    for op in steps:
        assert all(plan.tensors[t].space is Space.DEVICE for t in op.inputs + op.outputs), op.name
    zc = plan_for(tiny_dir(2), lora=False, use_zero_copy=True, **opts)
    assert all(op.attrs.get("zero_copy") for op in zc.ops if op.kind.endswith("_step"))


def test_plan_file_is_deterministic_across_processes(tiny_dir, tmp_path):
    import os
    import subprocess
    import sys

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {tiny_dir(2)}\nsequence_len: 64\nlora: false\ngpus: 2\nzero_level: 3\n"
                   "offload_optimizer: true\nmax_grad_norm: 1.0\n")
    files = []
    for seed in ("1", "2"):
        out = tmp_path / f"plan{seed}.bin"
        env = {**os.environ, "PYTHONHASHSEED": seed}
        code = ("import sys; from surogate.schema import load_config; from surogate.compiler.pipeline import "
                "compile_plan; from surogate.compiler.planfile import write_plan; "
                "write_plan(compile_plan(load_config(sys.argv[1])), sys.argv[2])")
        subprocess.run([sys.executable, "-c", code, str(cfg), str(out)], check=True, env=env, capture_output=True)
        files.append(out.read_bytes())
    assert files[0] == files[1]


def test_plan_cli_json_on_a_real_model(tiny_dir, tmp_path, capsys):
    from surogate.cli import main
    from surogate.compiler.planfile import read_plan

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {tiny_dir(2)}\nsequence_len: 64\nlora: true\nlora_rank: 4\noffload_residual: true\n")
    assert main(["plan", str(cfg), "--json", "-o", str(tmp_path / "plan.bin"), "--gpu-memory", "64KiB"]) == 0
    rep = json.loads(capsys.readouterr().out)
    plan = read_plan(tmp_path / "plan.bin")
    assert rep["parameters"] == plan.meta["parameters"] and rep["parameters"]["trainable"] < rep["parameters"]["total"]
    d = rep["memory"]["device"]
    assert d["peak_bytes"] == plan.arenas["device"] and rep["memory"]["host"]["peak_bytes"] == plan.arenas["host"] > 0
    assert sum(d["categories"].values()) == d["lower_bound_bytes"] <= d["peak_bytes"]
    assert d["categories"]["frozen_weights"] > 0 and d["categories"]["trainable_weights"] > 0
    assert rep["fits"] is False and rep["suggestions"]
    assert {k for s in rep["suggestions"] for k in s["changes"]} >= {"qlora_bnb"}


def test_qlora_offload_experts_moves_only_expert_quants_to_host(tmp_path):
    moe = {**tiny_config(2), "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
           "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "decoder_sparse_step": 1,
           "mlp_only_layers": [], "norm_topk_prob": True}
    (tmp_path / "config.json").write_text(json.dumps(moe))
    base = dict(lora=True, qlora_bnb=True)
    on = plan_for(str(tmp_path), **base)
    off = plan_for(str(tmp_path), **base, qlora_offload_experts=True)
    experts = {n for n, t in on.tensors.items() if t.role is Role.QUANT_WEIGHT and t.attrs.get("module") == "experts"}
    assert experts
    for n, t in off.tensors.items():
        if t.role in (Role.QUANT_WEIGHT, Role.QUANT_SCALE):
            owner = t.attrs.get("quant_of", n)
            is_expert = n in experts or any(owner == on.tensors[e].attrs["quant_of"] for e in experts)
            assert (t.space is Space.HOST) == is_expert, n
    assert off.memory["device"]["persistent"]["quantized_weights"] < on.memory["device"]["persistent"]["quantized_weights"]


KNOBS = dict(
    lora=[True, False], recompute=[True, False], offload_residual=[True, False], offload_master=[True, False],
    offload_optimizer=[True, False], offload_grads=[True, False], shard_gradients=[True, False],
    shard_weights=[True, False], persistent_quants=[True, False], offload_quants=[True, False],
    zero_level=[1, 2, 3], gpus=[1, 2, 4], optimizer=["adamw_8bit", "normuon"], max_grad_norm=[0.0, 1.0],
    master_dtype=[None, "fp32"], use_zero_copy=[True, False], qlora_bnb=[True, False],
    recipe=["bf16", "fp8_hybrid"], lmhead_chunks=[1, 4],
)


def test_random_valid_configs_plan_soundly(tiny_dir, tmp_path):
    """Seeded random option mixes: arena within 3% (+ a little alignment slack on a tiny model) of the
    lower bound, staged copies always current, plan.bin round trip identical."""
    import random

    from surogate.compiler.planfile import read_plan, write_plan
    from surogate.errors import ConfigError

    rng, done = random.Random(5), 0
    while done < 12:
        opts = {k: rng.choice(v) for k, v in KNOBS.items()}
        opts = {k: v for k, v in opts.items() if v is not None}
        try:
            cfg = config_from_dict({"model": tiny_dir(2, True), "sequence_len": 64, **opts})
        except ConfigError:
            continue
        plan = compile_plan(cfg)
        for space in ("device", "host"):
            m = plan.memory[space]
            assert m["lower_bound_bytes"] <= m["arena_bytes"] <= 1.03 * m["lower_bound_bytes"] + 4096, (opts, space)
        check_staging(plan)
        write_plan(plan, tmp_path / "p.bin")
        assert read_plan(tmp_path / "p.bin") == plan
        done += 1


def test_plan_meta_carries_what_the_runtime_needs(tiny_dir, tmp_path):
    from surogate.compiler.planfile import read_plan, write_plan

    d = tiny_dir(2)
    plan = plan_for(d, lora=True, lora_rank=4)
    write_plan(plan, tmp_path / "p.bin")
    meta = read_plan(tmp_path / "p.bin").meta
    assert meta["model_path"] == d and meta["spec"]["hf_config"]["hidden_size"] == 64
    assert meta["loss"] == "loss" and "input_ids" in meta["inputs"]
    assert meta["zero"]["world"] == 1 and meta["optimizer"]["kind"] == "adamw_8bit"
    assert meta["buffers"]["device"]["arena_bytes"] == plan.arenas["device"]


def test_qwen3_06b_preset_lora_counts_are_pefts(tmp_path, capsys):
    """The issue's figures: the real model's 596,049,920 parameters, 10,092,544 LoRA r16 parameters
    (all seven projections) trainable, frozen bf16 weights at exactly 2 bytes per parameter."""
    from surogate.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: Qwen/Qwen3-0.6B\nsequence_len: 256\nlora: true\nlora_rank: 16\nlora_target_modules: [all]\n")
    assert main(["plan", str(cfg), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["parameters"] == {"total": 596_049_920, "trainable": 10_092_544, "adapter": 10_092_544}
    assert rep["memory"]["device"]["categories"]["frozen_weights"] >= 2 * 596_049_920
    assert rep["memory"]["device"]["categories"]["frozen_weights"] < 2 * 596_049_920 + 256 * 400  # alignment only


def test_fp4_plans_say_the_fp4_backend_has_no_kernel_yet(tmp_path, capsys):
    from surogate.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: Qwen/Qwen3-0.6B\nsequence_len: 128\nrecipe: nvfp4\nfp4_backend: cudnn\n")
    assert main(["plan", str(cfg), "--json"]) == 0
    notes = json.loads(capsys.readouterr().out)["notes"]
    assert any(n.startswith("fp4_backend: 'cudnn'") and "no FP4 GEMM kernel" in n for n in notes), notes


def test_fp8_plans_say_where_the_fp8_matmuls_run_on_tensor_cores(tmp_path, capsys):
    from surogate.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: Qwen/Qwen3-0.6B\nsequence_len: 128\nrecipe: fp8_hybrid\n")
    assert main(["plan", str(cfg), "--json"]) == 0
    notes = json.loads(capsys.readouterr().out)["notes"]
    assert any(n.startswith("fp8_hybrid: the FP8 matmuls run on FP8 tensor cores") and "8.9+" in n
               and "dequantize + fp32 GEMM" in n for n in notes), notes
    cfg.write_text("model: Qwen/Qwen3-0.6B\nsequence_len: 128\n")
    assert main(["plan", str(cfg), "--json"]) == 0
    assert not [n for n in json.loads(capsys.readouterr().out)["notes"] if n.startswith("fp8_hybrid")]


@pytest.mark.parametrize("options, starts, words", [
    # found by fuzzing: accepted without effect and without a word
    ("router_aux_loss_coef: 0.1\nrouter_z_loss_coef: 0.01\n", "router_aux_loss_coef, router_z_loss_coef",
     "no MoE router"),
    ("lmhead_chunks: 100000\n", "lmhead_chunks: 100000", "256 chunks are used"),
    ("attn_bwd_chunks: 1000\n", "attn_bwd_chunks: 1000", "128 chunks are used"),
    ("recipe: fp8_hybrid\nskip_quant_first_layers: 1000\n", "skip_quant_first_layers", "quantizes nothing"),
    ("lora: true\nqlora_bnb: true\nskip_quant_first_layers: 20\nskip_quant_last_layers: 20\n",
     "skip_quant_first_layers", "QLoRA quantizes nothing"),
    ("lora: true\nlora_rank: 2000\n", "lora_rank: 2000", "smallest targeted projection's dimension (1024)"),
    ("lora: true\nqlora_fp8: true\npersistent_quants: true\noffload_quants: true\nshard_weights: true\n",
     "persistent_quants", "offload_quants (which requires it) still places the stored quantized weights in pinned"),
])
def test_plan_notes_options_that_do_nothing_in_this_plan(tmp_path, capsys, options, starts, words):
    from surogate.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: Qwen/Qwen3-0.6B\nsequence_len: 128\nper_device_train_batch_size: 2\n" + options)
    assert main(["plan", str(cfg), "--json"]) == 0
    notes = json.loads(capsys.readouterr().out)["notes"]
    assert any(n.startswith(starts) and words in n for n in notes), notes
    cfg.write_text("model: Qwen/Qwen3-0.6B\nsequence_len: 128\nper_device_train_batch_size: 2\nlmhead_chunks: 4\n"
                   "recipe: fp8_hybrid\nskip_quant_first_layers: 2\n")
    assert main(["plan", str(cfg), "--json"]) == 0
    notes = json.loads(capsys.readouterr().out)["notes"]
    assert not [n for n in notes if n.startswith(("router_", "lmhead_chunks", "attn_bwd", "skip_quant", "lora_rank"))], notes


def test_qlora_fp4_plans_name_no_fp4_gemm_backend(tmp_path, capsys):
    """Found by fuzzing: QLoRA FP4 (dequantized into the model dtype, no FP4 GEMM) printed a note about
    fp4_backend, an option the user had not set and that only the nvfp4 recipes read."""
    from surogate.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: Qwen/Qwen3-0.6B\nsequence_len: 128\nlora: true\nqlora_fp4: true\n")
    assert main(["plan", str(cfg), "--json"]) == 0
    assert not [n for n in json.loads(capsys.readouterr().out)["notes"] if n.startswith("fp4_backend")]
