"""Files read through the `datasets` library (CSV, Parquet, Arrow; tables.py): files without rows and corrupt
files are errors of ours, naming the file, with nothing else on stderr."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from surogate.cli import main
from surogate.errors import UserError
from surogate.runtime.data.sources import load_source, resolve_source

ROWS = [{"text": f"row {i}", "n": str(i)} for i in range(4)]


def ds(path):
    return SimpleNamespace(path=str(path), subset=None, split="train", samples=None)


def load(path):
    return load_source(resolve_source(ds(path), 0))


def write_csv(path: Path, rows: list[dict], header: str = "text,n\n") -> None:
    path.write_text(header + "".join(f"{r['text']},{r['n']}\n" for r in rows))


def write_parquet(path: Path, rows: list[dict]) -> None:
    schema = pa.schema([("text", pa.string()), ("n", pa.string())])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def write_arrow(path: Path, rows: list[dict]) -> None:
    table = pa.Table.from_pylist(rows, schema=pa.schema([("text", pa.string()), ("n", pa.string())]))
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        if rows:
            writer.write_table(table)


WRITERS = {"csv": write_csv, "parquet": write_parquet, "arrow": write_arrow}


@pytest.mark.parametrize("kind, problem", [("csv", "file has a header line and no rows"),
                                           ("parquet", "file has no rows"), ("arrow", "file has no rows")])
def test_a_file_without_rows_says_so(tmp_path, kind, problem):
    # a CSV header without rows said 'ValueError: Instruction "train" corresponds to no data!', an empty Parquet
    # file 'ArrowInvalid: BatchSize must be greater than 0, got 0' (found by fuzzing)
    WRITERS[kind](tmp_path / f"empty.{kind}", [])
    with pytest.raises(UserError, match=rf"datasets\[0\]\.path: could not load '.*empty\.{kind}': {problem}$"):
        load(tmp_path / f"empty.{kind}")
    (tmp_path / "d").mkdir()
    for i in range(2):
        WRITERS[kind](tmp_path / "d" / f"part-{i}.{kind}", [])
    with pytest.raises(UserError, match=r"could not load '.*d': its 2 files have no rows$"):
        load(tmp_path / "d")
    WRITERS[kind](tmp_path / "d" / f"part-2.{kind}", ROWS)  # a file without rows among others is no error
    assert list(load(tmp_path / "d")["text"]) == [r["text"] for r in ROWS]


@pytest.mark.parametrize("data", ["", "\n\n", "text,n\n\n\n"])
def test_an_empty_or_blank_csv_says_so(tmp_path, data):
    (tmp_path / "blank.csv").write_text(data)
    problem = "has a header line and no rows" if data.startswith("text") else "is empty \\(no rows\\)"
    with pytest.raises(UserError, match=rf"could not load '.*blank\.csv': file {problem}$"):
        load(tmp_path / "blank.csv")


def test_a_csv_without_rows_exits_2_from_the_cli(tmp_path, model_dir, capsys):
    write_csv(tmp_path / "empty.csv", [], header="instruction,output\n")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "model": model_dir(), "output_dir": str(tmp_path / "out"), "sequence_len": 64, "dataloader_num_workers": 0,
        "datasets": [{"path": str(tmp_path / "empty.csv"), "type": "instruction", "instruction_field": "instruction",
                      "output_field": "output"}]}))
    assert main(["tokenize", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"error: datasets[0].path: could not load {str(tmp_path / 'empty.csv')!r}: "
                                        "file has a header line and no rows"]


def _tokenize_config(tmp_path: Path, model: str, data: Path) -> str:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "model": model, "output_dir": str(tmp_path / "out"), "sequence_len": 64, "dataloader_num_workers": 0,
        "datasets": [{"path": str(data), "type": "text"}]}))
    return str(config)


@pytest.mark.parametrize("in_folder", [False, True])
def test_a_corrupt_parquet_file_is_one_error_naming_it(tmp_path, model_dir, capfd, in_folder):
    # the datasets library printed "Failed to read schema from '...' with error ArrowInvalid: ..." on stderr
    # before our error (found by fuzzing)
    (tmp_path / "d").mkdir()
    write_parquet(tmp_path / "d" / "a-good.parquet", ROWS)
    bad = tmp_path / "d" / "b-bad.parquet"
    bad.write_bytes(b"PAR1 not really parquet " * 8)
    data = tmp_path / "d" if in_folder else bad
    assert main(["tokenize", _tokenize_config(tmp_path, model_dir(), data)]) == 2
    captured = capfd.readouterr()
    which = f"file {str(bad)!r}: " if in_folder else ""
    assert captured.err.strip().splitlines() == [
        f"error: datasets[0].path: could not load {str(data)!r}: {which}ArrowInvalid: Parquet magic bytes not "
        "found in footer. Either the file is corrupted or this is not a parquet file."]


def test_errors_the_datasets_library_logs_are_not_printed(tmp_path, capfd, monkeypatch):
    from surogate.runtime.data import tables

    # past our own checks, the datasets library's parquet reader logs the error it raises: only ours is shown
    monkeypatch.setattr(tables, "_files_with_rows", lambda source: list(source.files))
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 not really parquet " * 8)
    with pytest.raises(UserError, match=r"could not load '.*bad\.parquet': ArrowInvalid: Parquet magic bytes"):
        load(bad)
    assert capfd.readouterr().err == ""
    import datasets

    assert datasets.utils.logging.get_verbosity() == datasets.utils.logging.ERROR  # restored after the load
