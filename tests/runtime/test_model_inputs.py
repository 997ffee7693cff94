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
