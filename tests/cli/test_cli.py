"""The command line as users meet it: exit codes, messages on stderr, no tracebacks, --json."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from surogate.cli import COMMANDS, main

ROOT = Path(__file__).resolve().parents[2]


def surogate(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "surogate", *args], capture_output=True, text=True, cwd=cwd or ROOT, timeout=120
    )


def test_validate_valid_file_exits_0(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("model: Qwen/Qwen3-0.6B\nlora_rank: 8\n")
    proc = surogate("validate", str(path))
    assert proc.returncode == 0, proc.stderr
    assert f"{path}: valid" in proc.stdout
    # valid for `plan`, but sft / pt refuse it: validate (what CI runs) says so; a config with data does not
    assert "warning: datasets: none given" in proc.stdout and "`surogate sft` / `pt` refuse to train" in proc.stdout
    path.write_text("model: Qwen/Qwen3-0.6B\ndatasets:\n  - path: d.jsonl\n    type: text\n")
    proc = surogate("validate", "--json", str(path))
    assert proc.returncode == 0 and json.loads(proc.stdout)["files"][0]["warnings"] == []


def test_validate_lists_every_error_and_exits_2(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: m\nlora_rnak: 8\nrecipe: fp4\ndatasets:\n  - path: a\n    type: instruction\n    instruction_field: q\n")
    proc = surogate("validate", str(path))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert f"{path}:2:1: lora_rnak: unknown option; did you mean `lora_rank`?" in proc.stderr
    assert f"{path}:3:1: recipe: got 'fp4'" in proc.stderr
    assert "datasets[0].output_field: missing required option" in proc.stderr
    assert "3 error(s)" in proc.stderr


def test_validate_json_output(tmp_path):
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text("model: m\nrecipe: nvfp4\n")
    bad.write_text("model: m\nzero_level: 5\n")
    proc = surogate("validate", "--json", str(good), str(bad))
    assert proc.returncode == 2
    report = json.loads(proc.stdout)
    assert report["valid"] is False
    by_file = {f["file"]: f for f in report["files"]}
    assert by_file[str(good)]["valid"] is True
    assert any("SM100" in r for r in by_file[str(good)]["requirements"])
    (err,) = by_file[str(bad)]["errors"]
    assert err["path"] == "zero_level" and err["value"] == 5 and err["line"] == 2 and err["column"] == 1


@pytest.mark.parametrize(
    "content, words",
    [(None, "no such config file"), ("", "the file is empty"), ("- a\n- b\n", "got a list"), ("a: [1\n", "YAML syntax error")],
)
def test_validate_bad_files_exit_2_without_traceback(tmp_path, content, words):
    path = tmp_path / "c.yaml"
    if content is not None:
        path.write_text(content)
    proc = surogate("validate", str(path))
    assert proc.returncode == 2
    assert words in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_validate_reports_pathological_files_and_goes_on_with_the_others(tmp_path):
    rec, deep, good = tmp_path / "rec.yaml", tmp_path / "deep.yaml", tmp_path / "good.yaml"
    rec.write_text("model: m\na: &x [*x]\n")
    deep.write_text("model: m\na: " + "[" * 1500 + "]" * 1500 + "\n")
    good.write_text("model: Qwen/Qwen3-0.6B\n")
    proc = surogate("validate", str(rec), "/dev/zero", str(deep), str(good))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr + proc.stdout
    assert f"{rec}:2:4: a[0]: recursive alias" in proc.stderr
    assert "/dev/zero: <config>: not a regular file" in proc.stderr
    assert f"{deep}:2:" in proc.stderr and "nested more than 64 levels deep" in proc.stderr
    assert f"{good}: valid" in proc.stdout


def test_schema_prints_the_json_schema():
    proc = surogate("schema")
    assert proc.returncode == 0
    schema = json.loads(proc.stdout)
    assert "lora_rank" in schema["properties"]


def test_schema_markdown_documents_every_option():
    proc = surogate("schema", "--markdown")
    assert proc.returncode == 0
    assert "| `lora_rank` | integer | `16` | >= 1, <= 2147483647 |" in proc.stdout
    assert "`datasets[].instruction_field`" in proc.stdout
    assert "`distributed.num_nodes`" in proc.stdout


def test_every_command_has_help(capsys):
    for name in COMMANDS:
        with pytest.raises(SystemExit) as info:
            main([name, "--help"])
        assert info.value.code == 0
        assert capsys.readouterr().out.startswith(f"usage: surogate {name}")


def test_missing_engine_says_so_and_exits_3(monkeypatch, capsys):
    monkeypatch.setitem(COMMANDS, "plan", ("surogate.not_a_module_yet", "compile"))
    assert main(["plan", "c.yaml"]) == 3
    assert "not available yet" in capsys.readouterr().err


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "validate" in capsys.readouterr().out
