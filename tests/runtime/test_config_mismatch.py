"""A resume refused for a changed option names the leaf that changed (`datasets[0].path: 'a' -> 'b'`), not the whole
list of dataset objects (it printed every field of every dataset, twice)."""

from __future__ import annotations

import pytest

from surogate.runtime.checkpoint_config import ConfigMismatchError, check_config_compatible


def _ds(path, **over):
    return {"path": path, "type": "text", "split": "train", "text_field": "text", "samples": None,
            "message_property_mappings": {"role": "role", "content": "content"}, **over}


def _refusal(old, new):
    with pytest.raises(ConfigMismatchError) as err:
        check_config_compatible({"hash": "a", "options": old}, {"hash": "b", "options": new}, "ck")
    return str(err.value).split("Differences: ")[1].split(". To resume")[0]


def test_a_changed_dataset_field_is_named_by_its_path():
    assert _refusal({"datasets": [_ds("a.jsonl")], "learning_rate": 1e-3},
                    {"datasets": [_ds("b.jsonl")], "learning_rate": 1e-3}) == "datasets[0].path: 'a.jsonl' -> 'b.jsonl'"
    assert _refusal({"datasets": [_ds("a.jsonl")]}, {"datasets": [_ds("a.jsonl", samples=10)]}) == \
        "datasets[0].samples: None -> 10"
    assert _refusal({"datasets": [_ds("a.jsonl")]},
                    {"datasets": [_ds("a.jsonl", message_property_mappings={"role": "from", "content": "content"})]}) \
        == "datasets[0].message_property_mappings.role: 'role' -> 'from'"


def test_datasets_added_or_removed_are_named_by_path():
    assert _refusal({"datasets": [_ds("a.jsonl")]}, {"datasets": [_ds("a.jsonl"), _ds("b.jsonl")]}) == \
        "datasets[1]: 'b.jsonl' added"
    assert _refusal({"datasets": [_ds("a.jsonl"), _ds("b.jsonl")]}, {"datasets": [_ds("b.jsonl")]}) == \
        "datasets[0].path: 'a.jsonl' -> 'b.jsonl'; datasets[1]: 'b.jsonl' removed"
    assert _refusal({"validation_datasets": None}, {"validation_datasets": [_ds("v.jsonl")]}).startswith(
        "validation_datasets: None -> [{'path': 'v.jsonl'")  # from none: the whole value
    assert _refusal({"learning_rate": 1e-3, "lora_target_modules": ["all"]},
                    {"learning_rate": 2e-3, "lora_target_modules": ["q_proj", "v_proj"]}) == \
        "learning_rate: 0.001 -> 0.002; lora_target_modules: ['all'] -> ['q_proj', 'v_proj']"  # plain lists whole


def test_the_global_batch_counts_data_parallel_replicas_and_older_checkpoints_still_match():
    """sequence_parallel_size may change on resume (the global batch is accumulation x ranks / sp); a checkpoint from
    before kept it among its options and named the global batch `... x ranks`."""
    from types import SimpleNamespace

    from surogate.runtime.checkpoint_config import GLOBAL_ACCUMULATION, config_fingerprint

    def fingerprint(**over):
        return config_fingerprint(SimpleNamespace(**{"gradient_accumulation_steps": 2, "gpus": 4,
                                                     "sequence_parallel_size": 1, "learning_rate": 1e-3, **over}))

    split = fingerprint(sequence_parallel_size=2, gradient_accumulation_steps=4)
    assert split["options"][GLOBAL_ACCUMULATION] == 8  # 4 x (4 ranks / 2)
    assert check_config_compatible(split, fingerprint(), "ck") == []  # 2 x 4 replicas: the same global batch
    assert _refusal(split["options"], fingerprint(sequence_parallel_size=2)["options"]) == \
        f"{GLOBAL_ACCUMULATION}: 8 -> 4"
    older = {"hash": "old", "options": {"gradient_accumulation_steps x ranks": 8, "sequence_parallel_size": 1,
                                        "learning_rate": 1e-3}}
    assert check_config_compatible(older, split, "ck") == []
    assert "learning_rate: 0.001 -> 0.002" in _refusal(older["options"], fingerprint(learning_rate=2e-3)["options"])
