"""Type / enum / range errors, unknown keys with hints, and malformed files: clear messages, right places."""

from __future__ import annotations

import pytest

from surogate.errors import UserError
from surogate.schema import validate_file, validate_text
from tests.schema.helpers import check, error_paths, messages


@pytest.mark.parametrize(
    "options, path, words",
    [
        ({"lora_rank": "16"}, "lora_rank", "expected an integer, got a string"),
        ({"lora": "yes"}, "lora", "expected true or false"),
        ({"learning_rate": "fast"}, "learning_rate", "expected a number"),
        ({"num_epochs": 1.5}, "num_epochs", "expected an integer"),
        ({"save_steps": True}, "save_steps", "got a boolean"),
        ({"recipe": "fp4"}, "recipe", "expected one of: 'bf16', 'fp8_hybrid', 'nvfp4', 'nvfp4_quartet'"),
        ({"optimizer": "adam"}, "optimizer", "expected one of"),
        ({"zero_level": 4}, "zero_level", "expected one of: 1, 2, 3"),
        ({"qlora_block_size": 100}, "qlora_block_size", "expected one of: 64, 128, 256"),
        ({"qlora_bnb_block_size": 32}, "qlora_bnb_block_size", "expected one of: 64, 128, 256, 512"),
        ({"validation_split_ratio": 1.0}, "validation_split_ratio", "must be < 1"),
        ({"validation_split_ratio": -0.1}, "validation_split_ratio", "must be >= 0"),
        ({"lora_alpha": 0}, "lora_alpha", "must be > 0"),
        ({"sequence_len": 0}, "sequence_len", "must be >= 1"),
        ({"learning_rate": 0}, "learning_rate", "must be > 0"),
        ({"lora_dropout": 1.0}, "lora_dropout", "must be < 1"),
        ({"warmup_ratio": 2}, "warmup_ratio", "must be <= 1"),
        ({"gpus": -1}, "gpus", "must be >= 0"),
        ({"lora_target_modules": []}, "lora_target_modules", "at least 1"),
        ({"lora_target_modules": ["q_proj", "qproj"]}, "lora_target_modules[1]", "expected one of"),
        ({"report_to": "tensorboard"}, "report_to", "'wandb', 'aim', or a list of them"),
        ({"report_to": ["wandb", "mlflow"]}, "report_to", "'wandb', 'aim', or a list of them"),
        ({"distributed": {"ray_address": "http://x"}}, "distributed.ray_address", "'auto', 'local'"),
        ({"distributed": {"num_nodes": 0}}, "distributed.num_nodes", "must be >= 1"),
        ({"datasets": [{"path": "a", "type": "csv"}]}, "datasets[0].type", "expected one of"),
        ({"datasets": [{"type": "text"}]}, "datasets[0].path", "missing required option"),
        ({"datasets": {"path": "a"}}, "datasets", "expected a list"),
        ({"model": ""}, "model", "must not be empty"),
    ],
)
def test_value_errors_name_field_value_and_expectation(options, path, words):
    result = check(**options)
    assert path in error_paths(result), messages(result)
    assert words in messages(result)


INT32_MAX, INT64_MAX = 2**31 - 1, 2**63 - 1


def _integer_options() -> list[tuple[str, str]]:
    """(path, option) of every integer option with a range (enums have their own list)."""
    from surogate.schema.source import dataset_properties, distributed_properties, properties

    out = []
    for prefix, props in (("", properties()), ("distributed.", distributed_properties()), ("ds.", dataset_properties())):
        for name, prop in props.items():
            types = prop.get("type")
            if "integer" in ([types] if isinstance(types, str) else types or []) and "enum" not in prop:
                out.append((prefix, name))
    return out


@pytest.mark.parametrize("prefix, name", _integer_options())
def test_every_integer_option_has_a_maximum(prefix, name):
    # 1e20 / 2**64 passed the schema and overflowed later (OverflowError in the planner's int64 buffer sizes,
    # torch.manual_seed, the worker pool's semaphore): each is now a range error naming the option.
    options = {"distributed": {name: 10**20}} if prefix == "distributed." else {name: 10**20}
    if prefix == "ds.":
        options = {"datasets": [{"path": "a.jsonl", "type": "text", name: 10**20}]}
    path = {"": name, "distributed.": f"distributed.{name}", "ds.": f"datasets[0].{name}"}[prefix]
    result = check(**options)
    assert path in error_paths(result) and "must be <=" in messages(result), messages(result)


@pytest.mark.parametrize(
    "option, top",
    [("train_seed", INT64_MAX), ("eval_seed", INT64_MAX), ("dataloader_num_workers", 1024),
     ("per_device_train_batch_size", INT32_MAX), ("lora_rank", INT32_MAX), ("gradient_accumulation_steps", INT32_MAX)],
)
def test_integer_maxima_are_inclusive(option, top):
    assert check(**{option: top, "sequence_len": 1}).ok
    result = check(**{option: top + 1, "sequence_len": 1})
    assert error_paths(result) == [option] and f"must be <= {top}" in messages(result)


def test_huge_float_written_for_an_integer_option_is_a_range_error():
    result = validate_text("model: m\nper_device_train_batch_size: 1e20\n")  # an integral float is an integer
    assert error_paths(result) == ["per_device_train_batch_size"] and "must be <= 2147483647" in messages(result)


def test_tokens_per_micro_step_fit_32_bit_offsets():
    result = check(per_device_train_batch_size=65536, sequence_len=32768)
    assert error_paths(result) == ["per_device_train_batch_size"]
    assert "2147483648 tokens" in messages(result) and "sequence_len: 32768" in messages(result)
    assert check(per_device_train_batch_size=65536, sequence_len=32767).ok


def test_missing_model_is_required():
    result = validate_text("lora: true\n", "c.yaml")
    assert error_paths(result) == ["model"]
    assert "missing required option" in messages(result)


@pytest.mark.parametrize(
    "key, hint",
    [("lora_rnak", "did you mean `lora_rank`?"), ("learning_rat", "did you mean `learning_rate`?"),
     ("sequence_length", "did you mean `sequence_len`?"), ("text_field", "dataset option")],
)
def test_unknown_top_level_keys_get_hints(key, hint):
    result = check(**{key: 1})
    assert error_paths(result) == [key]
    assert "unknown option" in messages(result) and hint in messages(result)


def test_unknown_nested_keys_get_hints():
    result = check(datasets=[{"path": "a", "type": "text", "text_feild": "t"}], distributed={"num_node": 2})
    assert set(error_paths(result)) == {"datasets[0].text_feild", "distributed.num_node"}
    assert "did you mean `text_field`?" in messages(result)
    assert "did you mean `num_nodes`?" in messages(result)


def test_errors_carry_file_line_and_column(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: m\nlora_rank: 16\ndatasets:\n  - path: a\n    type: text\n    text_feild: x\nrecipe: fp4\n")
    result = validate_file(path)
    located = {e.path: (e.source, e.line, e.column) for e in result.errors}
    assert located["datasets[0].text_feild"] == (str(path), 6, 5)
    assert located["recipe"] == (str(path), 7, 1)
    assert str(result.errors[0]).startswith(f"{path}:6:5: datasets[0].text_feild")


@pytest.mark.parametrize(
    "text, words, line",
    [
        ("model: m\nlora: [true\n", "YAML syntax error", 3),
        ("model: m\n  bad indent: 1\n", "YAML syntax error", 2),
        ("model: m\nlora_rank: 8\nlora_rank: 16\n", "duplicate key (first given at line 2)", 3),
        ("", "the file is empty", None),
        ("# only a comment\n", "the file is empty", None),
        ("- model: m\n", "must be a mapping of options, got a list", 1),
        ("just a string\n", "must be a mapping of options, got a str", 1),
    ],
)
def test_malformed_files(tmp_path, text, words, line):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    result = validate_file(path)
    assert not result.ok
    assert words in messages(result)
    assert result.errors[0].source == str(path)
    if line is not None:
        assert result.errors[0].line == line


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no such config file"):
        validate_file(tmp_path / "nope.yaml")


def test_exponent_floats_are_numbers():
    result = validate_text("model: m\nlearning_rate: 2e-4\nadamw_epsilon: 1e-8\n")
    assert result.ok, messages(result)
    assert result.config.learning_rate == pytest.approx(2e-4)
    assert result.config.adamw_epsilon == pytest.approx(1e-8)


@pytest.mark.parametrize("option", ["learning_rate", "weight_decay", "max_grad_norm", "adamw_epsilon", "lora_dropout"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_numbers_are_errors(option, value):
    result = check(**{option: value})  # YAML's .nan / .inf pass every range check of the schema
    assert not result.ok and error_paths(result) == [option]
    assert "finite" in messages(result) or "must be" in messages(result)



def test_non_finite_inside_datasets_names_the_entry():
    result = check(datasets=[{"path": "d.jsonl", "type": "text", "samples": float("inf")}])
    assert error_paths(result) == ["datasets[0].samples"], messages(result)


def test_empty_datasets_list_is_an_error():
    result = check(datasets=[])  # absent (null) is fine for `surogate plan`; an empty list is a mistake
    assert error_paths(result) == ["datasets"] and "at least 1" in messages(result)


@pytest.mark.parametrize(
    "text, words",
    [
        ("model: m\na: &x [*x]\n", "a[0]: recursive alias: the value contains itself"),
        ("model: m\na: &x {b: *x}\n", "a.b: recursive alias"),
        ("model: m\na: " + "[" * 1500 + "]" * 1500 + "\n", "nested more than 64 levels deep"),
        ("model: m\na: " + "[" * 200 + "]" * 200 + "\n", "nested more than 64 levels deep"),
        ("model: m\n" + "".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n" for i in range(1, 9)).replace(
            "*l0", "1"
        ), "more than 1000000 values"),
    ],
)
def test_pathological_yaml_is_a_config_error_naming_the_file(tmp_path, text, words):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    result = validate_file(path)  # was a RecursionError (or ran out of memory) before any issue was reported
    assert not result.ok
    assert words in messages(result)
    assert result.errors[0].source == str(path)


def test_plain_aliases_still_work():
    result = validate_text("model: m\nlora_target_modules: &t [q_proj, v_proj]\nx_unused: *t\n")
    assert "recursive" not in messages(result) and error_paths(result) == ["x_unused"]


def test_non_regular_files_are_refused():
    with pytest.raises(UserError, match="/dev/zero: not a regular file"):
        validate_file("/dev/zero")  # read forever before


def test_oversized_files_are_refused(tmp_path, monkeypatch):
    from surogate.schema import yaml_source

    monkeypatch.setattr(yaml_source, "MAX_CONFIG_BYTES", 64)
    path = tmp_path / "c.yaml"
    path.write_text("model: m\n" + "# padding\n" * 10)
    with pytest.raises(UserError, match="c.yaml: larger than"):
        validate_file(path)
