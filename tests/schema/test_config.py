"""The typed config: defaults from the schema, immutability, nesting, recommended values."""

from __future__ import annotations

import dataclasses
import pickle

import pytest

from surogate.errors import ConfigError
from surogate.schema import DatasetConfig, TrainConfig, config_from_dict, load_config, load_schema


def test_defaults_come_from_the_schema():
    cfg = config_from_dict({"model": "m"})
    schema = load_schema()
    for name, prop in schema["properties"].items():
        if name in ("distributed", "model"):
            continue
        value = getattr(cfg, name)
        expected = prop.get("default")
        assert (list(value) if isinstance(value, tuple) else value) == expected, name
    assert cfg.distributed.num_nodes == 1 and cfg.distributed.ray_address == "auto"


def test_fields_are_exactly_the_schema_properties():
    schema = load_schema()
    assert [f.name for f in dataclasses.fields(TrainConfig)] == list(schema["properties"])
    assert [f.name for f in dataclasses.fields(DatasetConfig)] == list(schema["$defs"]["dataset"]["properties"])


def test_config_is_immutable_and_picklable():
    cfg = config_from_dict(
        {"model": "m", "datasets": [{"path": "a", "type": "conversation", "message_property_mappings": {"role": "from", "content": "value"}}]}
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lora_rank = 8  # type: ignore[misc]
    with pytest.raises(TypeError):
        cfg.datasets[0].message_property_mappings["role"] = "x"
    assert isinstance(cfg.datasets, tuple) and isinstance(cfg.lora_target_modules, tuple)
    assert pickle.loads(pickle.dumps(cfg)) == cfg


def test_numbers_take_their_declared_type():
    cfg = config_from_dict({"model": "m", "learning_rate": 1, "lora_rank": 8.0})
    assert isinstance(cfg.learning_rate, float) and cfg.learning_rate == 1.0
    assert isinstance(cfg.lora_rank, int) and cfg.lora_rank == 8


def test_dataset_defaults_and_report_to_string():
    cfg = config_from_dict({"model": "m", "datasets": [{"path": "a", "type": "text"}], "report_to": "wandb"})
    ds = cfg.datasets[0]
    assert ds.split == "train" and ds.text_field == "text" and ds.samples is None
    assert cfg.report_to == ("wandb",)


def test_to_dict_round_trips():
    cfg = config_from_dict({"model": "m", "datasets": [{"path": "a", "type": "text"}], "distributed": {"num_nodes": 2, "gpus_per_node": 4}})
    again = config_from_dict(cfg.to_dict())
    assert again == cfg


def test_apply_recommended_values_fills_unset_options_only():
    schema = load_schema()
    recommended = {k: p["x-recommended"] for k, p in schema["properties"].items() if "x-recommended" in p}
    assert recommended  # the schema declares some
    cfg = config_from_dict({"model": "m", "apply_recommended_values": True, "max_grad_norm": 0.5})
    assert cfg.max_grad_norm == 0.5  # the user's value wins
    for key, value in recommended.items():
        if key != "max_grad_norm":
            assert getattr(cfg, key) == value, key
    plain = config_from_dict({"model": "m"})
    assert any(getattr(plain, k) != v for k, v in recommended.items())


def test_load_config_raises_with_every_issue(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: m\nlora_rank: x\nrecipe: y\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert [i.path for i in info.value.issues] == ["lora_rank", "recipe"]
    assert "2 error(s)" in str(info.value)
