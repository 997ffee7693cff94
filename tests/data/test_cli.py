"""`surogate tokenize CONFIG` (runtime/data/cli.py) through the real CLI entry point."""

from __future__ import annotations

import yaml

from surogate.cli import main
from tests.data.conftest import conv, write_jsonl


def write_config(tmp_path, model, data_path, **extra):
    cfg = {"model": model, "output_dir": str(tmp_path / "out"), "sequence_len": 64, "dataloader_num_workers": 0,
           "validation_split_ratio": 0.2, "datasets": [{"path": data_path, "type": "conversation"}], **extra}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_tokenize_prints_statistics_then_reuses_the_cache(tmp_path, model_dir, capsys):
    data = write_jsonl(tmp_path / "c.jsonl", [conv(f"hello {i}", f"world {i}") for i in range(10)])
    config = write_config(tmp_path, model_dir(), data)
    assert main(["tokenize", config]) == 0
    out = capsys.readouterr().out
    for label in ("input rows", "tokens trained on", "packed rows", "packing efficiency", "tokenized 10 rows"):
        assert label in out
    assert "eval" in out and "rows tokenized" in out
    assert main(["tokenize", config]) == 0
    assert "reused from cache" in capsys.readouterr().out
    assert main(["tokenize", config, "--no-cache"]) == 0
    assert "tokenized 10 rows" in capsys.readouterr().out


def test_tokenize_bad_row_exits_2_with_the_row_named(tmp_path, model_dir, capsys):
    rows = [conv("hello", "world"), {"messages": [{"role": "alien", "content": "x"}]}, conv("a", "b")]
    config = write_config(tmp_path, model_dir(), write_jsonl(tmp_path / "bad.jsonl", rows))
    assert main(["tokenize", config]) == 2
    captured = capsys.readouterr()
    message = captured.err + captured.out
    assert "bad.jsonl" in message and "row 1" in message and "unknown role 'alien'" in message
    assert "Traceback" not in message
    assert main(["tokenize", config, "--skip-bad-rows"]) == 0
    assert "skipped:" in capsys.readouterr().out
