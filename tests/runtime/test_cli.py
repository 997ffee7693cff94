"""The training commands end to end: `surogate sft`, `surogate pt`, and `surogate plan -o plan.bin` then
`surogate run plan.bin`, in subprocesses on a tiny model (exit 0, outputs written; the plan file trains exactly
like the config it came from). Bad input exits 2 (user error) or 3 (not available) with a one-line message
and no traceback."""

from __future__ import annotations

import json

import pytest

from surogate.cli import main
from surogate.runtime.observe.jsonl import read_log
from tests.runtime.helpers import run_cli, save_model, write_text_data, write_yaml, yaml_cfg


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    save_model(root / "model", "qwen3")
    write_text_data(root / "train.jsonl", rows=40)
    return root


def _yaml(root, name, **over):
    return write_yaml(root / f"{name}.yaml", yaml_cfg(root / "model", root / "train.jsonl", root / name, **over))


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


def _losses(out):
    return [r["loss"] for r in read_log(out / "log.jsonl").steps]


def test_sft_then_plan_and_run_train_identically(root):
    sft = run_cli("sft", str(_yaml(root, "sft", max_steps=3)))
    _ok(sft)
    assert "trained 3 step(s)" in sft.stdout
    adapter = root / "sft" / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4
    assert (root / "sft" / "checkpoint-3").is_dir()

    plan_file = root / "plan.bin"
    planned = run_cli("plan", str(_yaml(root, "run", max_steps=3)), "-o", str(plan_file))
    _ok(planned)
    assert plan_file.is_file() and plan_file.stat().st_size > 0
    ran = run_cli("run", str(plan_file))
    _ok(ran)
    assert (root / "run" / "adapter" / "adapter_model.safetensors").is_file()
    # the plan file carries everything: same data, same init, same steps as the config it was compiled from
    assert _losses(root / "run") == _losses(root / "sft")


def test_pt_full_pretraining(root):
    pt = run_cli("pt", str(_yaml(root, "pt", lora=False, max_steps=2)))
    _ok(pt)
    model = root / "pt" / "model"
    assert (model / "config.json").is_file() and any(model.glob("*.safetensors"))
    assert len(_losses(root / "pt")) == 2


def _main_code(capsys, *argv):
    code = main(list(argv))  # an uncaught exception (a traceback) fails the test here
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize("case,over,code,message", [
    ("missing-model", {"model": "/nonexistent/model-folder"}, 2, "model: directory '/nonexistent/model-folder'"),
    ("missing-data", {"datasets": [{"path": "/nonexistent/train.jsonl", "type": "text"}]}, 2,
     "datasets[0].path"),
    ("fp8-on-cpu", {"recipe": "fp8_hybrid"}, 3, "recipe 'fp8_hybrid'"),
])
def test_bad_input_is_a_clear_error(root, capsys, case, over, code, message):
    got, err = _main_code(capsys, "sft", str(_yaml(root, case, **over)))
    assert got == code, err
    assert err.startswith("error: ") and message in err, err
    assert "Traceback" not in err


def test_pt_refuses_conversation_data(root, capsys):
    got, err = _main_code(capsys, "pt", str(_yaml(root, "pt-bad", datasets=[{"path": str(root / "train.jsonl"),
                                                                               "type": "conversation"}])))
    assert got == 2 and "pre-training reads raw text" in err


def test_pt_refuses_auto_detected_and_validation_conversations(root, capsys):
    # both trained with assistant-only masks under `surogate pt` (found by fuzzing)
    from surogate.runtime.cli_pt import check_text_only
    from surogate.schema import load_config

    conv = root / "conv.jsonl"
    conv.write_text(json.dumps({"messages": [{"role": "user", "content": "w1"},
                                             {"role": "assistant", "content": "w2"}]}) + "\n")
    auto = [{"path": str(conv), "type": "auto"}]
    got, err = _main_code(capsys, "pt", str(_yaml(root, "pt-auto", datasets=auto)))
    assert got == 2 and err.startswith("error: datasets[0].type: auto detects conversation data"), err
    val = [{"path": str(conv), "type": "conversation"}]
    got, err = _main_code(capsys, "pt", str(_yaml(root, "pt-val", validation_datasets=val)))
    assert got == 2 and err.startswith("error: validation_datasets[0].type: pre-training reads raw text"), err
    text = load_config(str(_yaml(root, "pt-text", datasets=[{"path": str(root / "train.jsonl"), "type": "auto"}])))
    check_text_only(text)  # auto on text data: accepted


def test_run_rejects_a_file_that_is_not_a_plan(root, capsys):
    bogus = root / "bogus.bin"
    bogus.write_bytes(b"not a plan")
    got, err = _main_code(capsys, "run", str(bogus))
    assert got == 2 and "bogus.bin" in err, err
    got, err = _main_code(capsys, "run", str(root / "missing.bin"))
    assert got == 2 and "missing.bin" in err, err


def test_max_steps_override(root, capsys):
    got, err = _main_code(capsys, "sft", str(_yaml(root, "override", max_steps=50)), "--max-steps", "1")
    assert got == 0, err
    assert len(_losses(root / "override")) == 1
