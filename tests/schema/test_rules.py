"""Every cross-field rule: the failing combination is an error naming the field, the fixed one passes."""

from __future__ import annotations

import pytest

from tests.schema.helpers import check, error_paths, messages

INSTR = {"path": "d.jsonl", "type": "instruction", "instruction_field": "q", "output_field": "a"}


@pytest.mark.parametrize(
    "bad, good, path, words",
    [
        ({"offload_quants": True}, {"offload_quants": True, "persistent_quants": True, "shard_weights": True, "qlora_bnb": True},
         "offload_quants", "persistent_quants"),
        ({"persistent_quants": True, "qlora_fp8": True}, {"persistent_quants": True, "qlora_fp8": True, "shard_weights": True},
         "persistent_quants", "shard_weights"),
        ({"persistent_quants": True, "shard_weights": True}, {"persistent_quants": True, "shard_weights": True, "recipe": "fp8_hybrid"},
         "persistent_quants", "nothing to keep"),
        ({"gradient_dtype": "fp8_e4m3"}, {"gradient_dtype": "fp8_e4m3", "recipe": "fp8_hybrid"}, "gradient_dtype",
         "recipe: fp8_hybrid"),
        ({"offload_grads": True}, {"offload_grads": True, "zero_level": 2}, "offload_grads", "zero_level >= 2"),
        ({"offload_grads": True, "zero_level": 1}, {"offload_grads": True, "shard_gradients": True}, "offload_grads", "shard_gradients"),
        ({"adapter_path": "a", "lora": False}, {"adapter_path": "a"}, "adapter_path", "lora: true"),
        ({"merge_adapter": True, "lora": False}, {"merge_adapter": True}, "merge_adapter", "lora: true"),
        ({"qlora_bnb": True, "qlora_fp8": True}, {"qlora_bnb": True}, "qlora_bnb", "only one QLoRA mode"),
        ({"qlora_bnb": True, "lora": False}, {"qlora_bnb": True}, "qlora_bnb", "lora: true"),
        ({"from_scratch": True}, {"from_scratch": True, "lora": False}, "from_scratch", "lora: false"),
        ({"template": "qwen-3x"}, {"template": "Qwen2.5"}, "template", "unknown template"),
        ({"template": "{% for m in messages %}{{ m.content }"}, {"template": "{% for m in messages %}{{ m.content }}"
                                                                  "{% endfor %}"}, "template", "does not parse: line 1"),
        ({"loss_scale": '{"promt": 1}'}, {"loss_scale": '{"prompt": 0.1, "patterns": {"Action:": 2}}'}, "loss_scale",
         "unknown key"),
        ({"loss_scale": "last_turn"}, {"loss_scale": "last_round"}, "loss_scale", "existing .json file"),
        ({"agent_template": "bogus"}, {"agent_template": "react_en"}, "agent_template", "expected one of"),
        ({"rope_scaling": "yarn"}, {"rope_scaling": "yarn", "max_model_len": 8192}, "max_model_len", "required"),
        ({"rope_scaling": "ntk"}, {"rope_scaling": "linear", "max_model_len": 4096}, "rope_scaling", "expected one of"),
        ({"rope_scaling": '{"factor": 2.0'}, {"rope_scaling": '{"factor": 2.0, "type": "yarn"}'}, "rope_scaling", "not valid JSON"),
        ({"rope_scaling": '{"type": "yarn"}'}, {"rope_scaling": '{"rope_type": "yarn", "factor": 4}'}, "rope_scaling", "factor"),
        ({"rope_scaling": '{"type": "weird", "factor": 2}'}, {"rope_scaling": '{"type": "llama3", "factor": 8}'}, "rope_scaling", "type"),
        ({"max_length": 4096, "sequence_len": 1024}, {"max_length": 512, "sequence_len": 1024}, "max_length", "sequence_len"),
        ({"max_steps": 0}, {"max_steps": 10}, "max_steps", "-1"),
        ({"output_dir": ""}, {"output_dir": "out"}, "output_dir", "must not be empty"),  # wrote into the cwd
        ({"sequence_parallel_size": 3, "gpus": 4}, {"sequence_parallel_size": 2, "gpus": 4}, "sequence_parallel_size", "divide"),
        ({"distributed": {"num_nodes": 2}, "gpus": 0}, {"distributed": {"num_nodes": 2, "gpus_per_node": 8}, "gpus": 0},
         "distributed.gpus_per_node", "GPU count"),
        ({"datasets": [{**INSTR, "system_prompt_type": "field"}]},
         {"datasets": [{**INSTR, "system_prompt_type": "field", "system_prompt_field": "sys"}]},
         "datasets[0].system_prompt_field", "system_prompt_type: field"),
        ({"datasets": [{**INSTR, "system_prompt_type": "fixed"}]},
         {"datasets": [{**INSTR, "system_prompt_type": "fixed", "system_prompt": "Be nice."}]},
         "datasets[0].system_prompt", "system_prompt_type: fixed"),
        ({"datasets": [{**INSTR, "system_prompt": "Be nice."}]},
         {"datasets": [{**INSTR, "system_prompt": "Be nice.", "system_prompt_type": "fixed"}]},
         "datasets[0].system_prompt", "only used with"),
        ({"datasets": [{**INSTR, "text_field": "t"}]}, {"datasets": [INSTR]}, "datasets[0].text_field", "type: text"),
        ({"datasets": [{**INSTR, "prompt_format": "{instruction} {answer}"}]},
         {"datasets": [{**INSTR, "prompt_format": "Q: {instruction}\n{input}\nA: {output}"}]},
         "datasets[0].prompt_format", "unknown placeholder"),
        ({"datasets": [{**INSTR, "prompt_format": "{instruction!r} {output}"}]},
         {"datasets": [{**INSTR, "prompt_format": '{{"q": "{instruction}"}} {output}'}]},
         "datasets[0].prompt_format", "plain names"),
        ({"datasets": [{**INSTR, "prompt_format_no_input": "{instruction} {input} {output}"}]},
         {"datasets": [{**INSTR, "prompt_format_no_input": "{instruction} {output}"}]},
         "datasets[0].prompt_format_no_input", "{input}"),
        ({"datasets": [{**INSTR, "prompt_format": "Q: {instruction}"}]},
         {"datasets": [{**INSTR, "prompt_format": "Q: {instruction} A: {output}"}]},
         "datasets[0].prompt_format", "{output} exactly once"),
        ({"datasets": [{**INSTR, "prompt_format": "{output} {output}"}]},
         {"datasets": [{**INSTR, "prompt_format": "{output}"}]},
         "datasets[0].prompt_format", "{output} exactly once"),
        ({"validation_datasets": [{"path": "c", "type": "conversation", "message_property_mappings": {"role": "from", "speaker": "x"}}]},
         {"validation_datasets": [{"path": "c", "type": "conversation", "message_property_mappings": {"role": "from"}}]},
         "validation_datasets[0].message_property_mappings", "unknown key 'speaker'"),
        ({"datasets": [{"path": "c", "type": "conversation", "message_property_mappings": {"role.human": "person"}}]},
         {"datasets": [{"path": "c", "type": "conversation", "message_property_mappings": {"role.human": "user"}}]},
         "datasets[0].message_property_mappings.role.human", "'person' is not a role"),
    ],
)
def test_rule(bad, good, path, words):
    result = check(**bad)
    assert path in error_paths(result), messages(result)
    assert words in messages(result)
    fixed = check(**good)
    assert fixed.ok, messages(fixed)


def test_instruction_dataset_needs_its_fields():
    result = check(datasets=[{"path": "d", "type": "instruction", "instruction_field": "q"}])
    assert error_paths(result) == ["datasets[0].output_field"]
    assert "required when type is 'instruction'" in messages(result)


def _notices(result, kind):
    return {n.path: n.message for n in result.notices if n.kind == kind}


def test_warmup_steps_override_ratio_is_reported():
    result = check(warmup_steps=10, warmup_ratio=0.1)
    assert result.ok
    assert "overrides" in _notices(result, "warning")["warmup_ratio"]


@pytest.mark.parametrize(
    "options, path",
    [
        ({"recipe": "nvfp4"}, "recipe"),
        ({"recipe": "nvfp4_quartet"}, "recipe"),
        ({"qlora_fp4": True}, "qlora_fp4"),
    ],
)
def test_fp4_needs_blackwell_at_run_time_but_plans_anywhere(options, path):
    result = check(**options)
    assert result.ok  # a plan may be made for such a target on any machine
    assert "SM100" in _notices(result, "requirement")[path]


@pytest.mark.parametrize(
    "options, path",
    [
        ({"fp8_amax_history": 32}, "fp8_amax_history"),
        ({"fp4_backend": "cudnn"}, "fp4_backend"),
        ({"skip_quant_first_layers": 2}, "skip_quant_first_layers"),
        ({"qlora_bnb_block_size": 128}, "qlora_bnb_block_size"),
        ({"qlora_block_size": 64}, "qlora_block_size"),
        ({"normuon_momentum": 0.9}, "normuon_momentum"),
        ({"lora": False, "lora_rank": 8}, "lora_rank"),
        ({"wandb_project": "p"}, "wandb_project"),
        ({"aim_repo": "r"}, "aim_repo"),
        ({"use_zero_copy": True}, "use_zero_copy"),
        ({"lora_target_modules": ["all", "q_proj"]}, "lora_target_modules"),
        ({"lr_scheduler_type": "wsd"}, "cooldown_steps"),
        ({"init_projections_to_zero": True}, "init_projections_to_zero"),
        ({"lr_scheduler_type": "cosine", "cooldown_steps": 10}, "cooldown_steps"),
        ({"qlora_offload_experts": True}, "qlora_offload_experts"),
        ({"qlora_selective_expert_dequant": True}, "qlora_selective_expert_dequant"),
        ({"padding_free": True}, "padding_free"),
        ({"use_write_combined": True}, "use_write_combined"),
        ({"template": "chatml", "use_chat_template": False}, "template"),
        # found by fuzzing: a warmup as long as the run never reaches learning_rate; a wsd cooldown cut short; a
        # split ratio beside validation_datasets (the pipeline splits nothing off then)
        ({"max_steps": 2, "warmup_steps": 100}, "warmup_steps"),
        ({"max_steps": 10, "lr_scheduler_type": "wsd", "warmup_steps": 5, "cooldown_steps": 100}, "cooldown_steps"),
        ({"validation_datasets": [{"path": "v.jsonl", "type": "text"}], "validation_split_ratio": 0.2},
         "validation_split_ratio"),
        ({"validation_split_ratio": 0, "eval_steps": 1}, "eval_steps"),
        ({"validation_split_ratio": 0, "eval_seed": 5}, "eval_seed"),
    ],
)
def test_options_without_effect_are_never_silent(options, path):
    result = check(**options)
    assert result.ok, messages(result)
    assert path in _notices(result, "warning")


def test_template_names_are_the_runtime_built_ins():
    from surogate.runtime.data.agent import AGENT_TEMPLATES
    from surogate.runtime.data.templates import CHAT_TEMPLATE_MAPPING
    from surogate.schema.chat_templates import CHAT_TEMPLATE_NAMES
    from surogate.schema.source import load_schema

    assert set(CHAT_TEMPLATE_NAMES) == set(CHAT_TEMPLATE_MAPPING)
    assert load_schema()["properties"]["agent_template"]["enum"] == [*AGENT_TEMPLATES, None]
    assert check(template="{% for m in messages %}{{ m.content }}{% endfor %}").ok  # Jinja source: no name


def test_all_errors_reported_at_once():
    result = check(lora_rnak=4, recipe="fp4", offload_grads=True, lora_alpha=0, sequence_len=0)
    assert set(error_paths(result)) == {"lora_rnak", "recipe", "offload_grads", "lora_alpha", "sequence_len"}


def test_deeply_nested_rope_scaling_is_an_error_not_a_crash():
    deep = '{"type": "yarn", "factor": ' + "[" * 100_000 + "]" * 100_000 + "}"
    result = check(rope_scaling=deep, max_model_len=4096)
    assert error_paths(result) == ["rope_scaling"] and "nested too deeply" in messages(result)


def test_every_rule_is_registered_once():
    import inspect

    from surogate.schema import input_rules, rules

    assert len(rules.RULES) == len(set(rules.RULES))
    public = [f for name, f in inspect.getmembers(input_rules, inspect.isfunction)
              if f.__module__ == input_rules.__name__ and not name.startswith("_") and name != "parse_rope_scaling"]
    assert public and all(f in rules.RULES for f in public)


def test_collective_options_say_when_they_have_no_effect():
    single = _notices(check(memcpy_all_gather=True, use_all_to_all_reduce=True), "warning")
    assert "single GPU" in single["memcpy_all_gather"] and "single GPU" in single["use_all_to_all_reduce"]
    many = _notices(check(gpus=2, memcpy_all_gather=True, memcpy_send_recv=True, use_all_to_all_reduce=True),
                    "warning")
    assert "threads backend only" in many["memcpy_all_gather"] and "threads backend only" in many["memcpy_send_recv"]
    assert "use_all_to_all_reduce" not in many  # with ranks it picks the reduction algorithm (tests/distributed)


def test_template_with_the_chat_template_on_is_no_warning():
    assert "template" not in _notices(check(template="chatml"), "warning")


@pytest.mark.parametrize(
    "value, words",
    [
        ('{"prompt": 1' + "0" * 400 + "}", "prompt: expected a finite number >= 0"),  # OverflowError before
        ('{"patterns": {"a": 1' + "0" * 400 + "}}", "patterns['a']: expected a finite number"),
        ('{"prompt": 1' + "0" * 5000 + "}", "not valid JSON: Exceeds the limit"),  # ValueError before
        ('{"response": 1e300}', "at most 3.403e+38, weights are float32"),  # inf in the batches: no step applied
        ('{"response": 1e-50}', "is 0 in float32"),
        ('{"response": 0, "last_round": 0}', "every weight is 0"),  # blamed row 0 of the data before
        ('{"response": 0, "patterns": {"x": 0}}', "every weight is 0"),
    ],
)
def test_unusable_loss_scale_is_a_config_error(value, words):
    result = check(loss_scale=value)
    assert error_paths(result) == ["loss_scale"] and words in messages(result), messages(result)
    assert len(messages(result)) < 300  # a 400-digit weight is shown shortened


@pytest.mark.parametrize("value", ['{"response": 0, "patterns": {"Action:": 1}}', '{"response": 0, "prompt": 0.5}',
                                   '{"response": 3e38}'])
def test_loss_scale_with_some_positive_weight_is_valid(value):
    result = check(loss_scale=value)
    assert result.ok, messages(result)


@pytest.mark.parametrize("options", [
    {"max_steps": 3, "warmup_steps": 2},  # shorter than the run
    {"max_steps": -1, "warmup_steps": 100},  # steps from the data: the run's start summary says it
    {"max_steps": 20, "lr_scheduler_type": "wsd", "warmup_steps": 5, "cooldown_steps": 15},
    {"validation_datasets": [{"path": "v.jsonl", "type": "text"}]},  # the default ratio: nothing given
    {"validation_split_ratio": 0.1, "eval_steps": 5},
    {"validation_split_ratio": 0, "validation_datasets": [{"path": "v.jsonl", "type": "text"}], "eval_steps": 5},
])
def test_schedules_that_fit_and_default_split_ratio_are_not_warned(options):
    result = check(**options)
    assert result.ok and not {"warmup_steps", "cooldown_steps", "validation_split_ratio", "eval_steps"} & set(
        _notices(result, "warning")), _notices(result, "warning")
