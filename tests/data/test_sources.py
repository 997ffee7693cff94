"""Sources: local files of every kind, folders, fsspec URLs, hub ids offline, `samples` (sources.py)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from surogate.errors import UserError
from surogate.runtime.data.sources import file_fingerprint, load_source, resolve_source
from tests.data.conftest import write_jsonl

ROWS = [{"text": f"row {i}", "n": i} for i in range(6)]


def ds(path, **kw):
    return SimpleNamespace(path=str(path), subset=kw.get("subset"), split=kw.get("split", "train"),
                           samples=kw.get("samples"))


def texts(source):
    return load_source(source)["text"]


def write_arrow(path, rows):
    table = pa.Table.from_pylist(rows)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)


@pytest.mark.parametrize("ext", ["jsonl", "json", "parquet", "csv", "arrow"])
def test_local_files_of_each_kind(tmp_path, ext):
    path = tmp_path / f"data.{ext}"
    if ext == "jsonl":
        write_jsonl(path, ROWS)
    elif ext == "json":
        path.write_text(json.dumps(ROWS))
    elif ext == "parquet":
        pq.write_table(pa.Table.from_pylist(ROWS), path)
    elif ext == "csv":
        path.write_text("text,n\n" + "".join(f"{r['text']},{r['n']}\n" for r in ROWS))
    else:
        write_arrow(path, ROWS)
    source = resolve_source(ds(path), 0)
    assert source.kind == "local" and source.builder in ("json", "parquet", "csv", "arrow")
    assert texts(source) == [r["text"] for r in ROWS]


def test_txt_is_one_row_per_line_and_samples_limits(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("first line\nsecond line\nthird line\n")
    assert texts(resolve_source(ds(path), 0)) == ["first line", "second line", "third line"]
    assert texts(resolve_source(ds(path, samples=2), 0)) == ["first line", "second line"]


def test_folder_of_files_is_read_recursively_in_sorted_order(tmp_path):
    write_jsonl(tmp_path / "d" / "b.jsonl", ROWS[3:])
    write_jsonl(tmp_path / "d" / "sub" / "c.jsonl", [{"text": "deep", "n": 9}])
    write_jsonl(tmp_path / "d" / "a.jsonl", ROWS[:3])
    (tmp_path / "d" / "README.md").write_text("ignored")
    source = resolve_source(ds(tmp_path / "d"), 0)
    assert len(source.files) == 3
    assert texts(source) == [r["text"] for r in ROWS] + ["deep"]


def test_folder_mixing_kinds_or_without_data_is_an_error(tmp_path):
    write_jsonl(tmp_path / "m" / "a.jsonl", ROWS)
    (tmp_path / "m" / "b.csv").write_text("text\nx\n")
    with pytest.raises(UserError, match=r"datasets\[0\]\.path: .* mixes file kinds \(csv, json\)"):
        resolve_source(ds(tmp_path / "m"), 0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no data files"):
        resolve_source(ds(tmp_path / "empty"), 0)


def test_save_to_disk_folder(tmp_path):
    import datasets

    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    source = resolve_source(ds(tmp_path / "saved"), 0)
    assert source.kind == "disk" and texts(source) == [r["text"] for r in ROWS]


def test_missing_and_unsupported_local_paths(tmp_path):
    with pytest.raises(UserError, match=r"validation_datasets\[2\]\.path: file or folder .* does not exist"):
        resolve_source(ds(tmp_path / "nope.jsonl"), 2, "validation_datasets")
    (tmp_path / "x.xml").write_text("<a/>")
    with pytest.raises(UserError, match="unsupported file type '.xml'"):
        resolve_source(ds(tmp_path / "x.xml"), 0)


def test_broken_file_is_a_user_error_naming_the_path(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(UserError, match=r"datasets\[0\]\.path: could not load .*broken\.jsonl"):
        load_source(resolve_source(ds(path), 0))


def test_fsspec_urls_memory_and_file(tmp_path):
    fs = fsspec.filesystem("memory")
    with fs.open("/bucket/data/part-0.jsonl", "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in ROWS[:2]))
    with fs.open("/bucket/data/part-1.jsonl", "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in ROWS[2:]))
    single = resolve_source(ds("memory://bucket/data/part-0.jsonl"), 0)
    assert single.kind == "url" and texts(single) == ["row 0", "row 1"]
    folder = resolve_source(ds("memory://bucket/data"), 0)
    assert folder.files == ("memory://bucket/data/part-0.jsonl", "memory://bucket/data/part-1.jsonl")
    assert texts(folder) == [r["text"] for r in ROWS]
    assert len(file_fingerprint(folder)) == 2 and all('"size"' in f[1] for f in file_fingerprint(folder))
    path = write_jsonl(tmp_path / "f.jsonl", ROWS)
    assert texts(resolve_source(ds(f"file://{path}"), 0)) == [r["text"] for r in ROWS]
    with pytest.raises(UserError, match=r"memory://bucket/missing.jsonl' does not exist"):
        resolve_source(ds("memory://bucket/missing.jsonl"), 0)


def test_unknown_url_scheme_is_a_user_error():
    with pytest.raises(UserError, match=r"datasets\[0\]\.path: cannot open 'nosuchfs://x/y.jsonl'"):
        resolve_source(ds("nosuchfs://x/y.jsonl"), 0)


@pytest.fixture
def offline_hf(monkeypatch, tmp_path):
    """An empty, offline Hugging Face cache; returns the datasets cache folder."""
    import datasets.config
    import huggingface_hub.constants

    cache = tmp_path / "hf" / "datasets"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # The libraries read the variables at import time; patch their constants too (no network attempt).
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    return cache


def test_hub_id_from_the_local_cache_when_offline(offline_hf, tmp_path):
    import shutil

    import datasets

    # Lay out the cache the way an earlier online `load_dataset("me/tiny")` leaves it.
    builder = datasets.load_dataset_builder("json", data_files={"train": write_jsonl(tmp_path / "t.jsonl", ROWS)},
                                            cache_dir=str(tmp_path / "build"))
    builder.download_and_prepare()
    target = offline_hf / "me___tiny" / "default" / "0.0.0" / "0123abcd"
    shutil.copytree(builder.cache_dir, target)
    for arrow in target.glob("json-train*.arrow"):
        arrow.rename(target / arrow.name.replace("json-", "tiny-"))
    assert texts(resolve_source(ds("me/tiny", samples=4), 0)) == [r["text"] for r in ROWS[:4]]


def test_hub_id_not_cached_while_offline_is_a_clear_error(offline_hf):
    source = resolve_source(ds("someone/not-cached-dataset", subset="en", split="test"), 0)
    assert (source.kind, source.subset, source.split) == ("hub", "en", "test")
    with pytest.raises(UserError, match=r"datasets\[0\]\.path: could not load 'someone/not-cached-dataset' "
                                        r"\(offline: the dataset is not in the local Hugging Face cache"):
        load_source(source)


def test_local_fingerprint_changes_with_the_file(tmp_path):
    path = tmp_path / "d.jsonl"
    write_jsonl(path, ROWS)
    before = file_fingerprint(resolve_source(ds(path), 0))
    write_jsonl(path, ROWS + ROWS)
    assert file_fingerprint(resolve_source(ds(path), 0)) != before


def test_folder_file_names_select_the_split(tmp_path):
    write_jsonl(tmp_path / "d" / "train-00000.jsonl", ROWS[:4])
    write_jsonl(tmp_path / "d" / "test.jsonl", ROWS[4:5])
    write_jsonl(tmp_path / "d" / "dev" / "part.jsonl", ROWS[5:])
    assert texts(resolve_source(ds(tmp_path / "d"), 0)) == [r["text"] for r in ROWS[:4]]
    assert texts(resolve_source(ds(tmp_path / "d", split="test"), 0)) == ["row 4"]
    assert texts(resolve_source(ds(tmp_path / "d", split="validation"), 0)) == ["row 5"]
    with pytest.raises(UserError, match=r"datasets\[0\]\.split: no 'holdout' files .* splits test, train, validation"):
        resolve_source(ds(tmp_path / "d", split="holdout"), 0)


def test_a_split_named_exactly_wins_over_its_kind(tmp_path):
    """`train_sft` reads train_sft's files, not every train-like file (train_gen too)."""
    write_jsonl(tmp_path / "d" / "train_sft-00000.jsonl", ROWS[:2])
    write_jsonl(tmp_path / "d" / "train_gen-00000.jsonl", ROWS[2:4])
    write_jsonl(tmp_path / "d" / "test_sft.jsonl", ROWS[4:])
    assert texts(resolve_source(ds(tmp_path / "d", split="train_sft"), 0)) == ["row 0", "row 1"]
    assert texts(resolve_source(ds(tmp_path / "d", split="train_gen"), 0)) == ["row 2", "row 3"]
    assert texts(resolve_source(ds(tmp_path / "d", split="test"), 0)) == ["row 4", "row 5"]  # by kind


def test_options_without_effect_on_a_source_are_notes(tmp_path):
    """subset on anything but a hub id, split on a single file or a folder without split names: each a note
    naming the option (shown in the run's start summary), never silently dropped; the defaults give none."""
    write_jsonl(tmp_path / "one.jsonl", ROWS)
    write_jsonl(tmp_path / "plain" / "part-a.jsonl", ROWS)
    for path in (tmp_path / "one.jsonl", tmp_path / "plain", f"file://{tmp_path / 'one.jsonl'}"):
        assert resolve_source(ds(path), 0).notes == ()
        notes = resolve_source(ds(path, split="test", subset="en"), 3, "validation_datasets").notes
        assert len(notes) == 2, notes
        assert notes[0].startswith("validation_datasets[3].split: 'test' has no effect")
        assert notes[1].startswith("validation_datasets[3].subset: 'en' has no effect")
    assert "a single file has no splits" in resolve_source(ds(tmp_path / "one.jsonl", split="test"), 0).notes[0]
    assert "mark no splits" in resolve_source(ds(tmp_path / "plain", split="test"), 0).notes[0]


def test_saved_dataset_dict_folder_picks_its_split(tmp_path):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:4]),
                          "test": datasets.Dataset.from_list(ROWS[4:])}).save_to_disk(str(tmp_path / "dd"))
    source = resolve_source(ds(tmp_path / "dd", split="test"), 0)
    assert source.kind == "disk" and source.notes == () and texts(source) == ["row 4", "row 5"]
    assert texts(resolve_source(ds(tmp_path / "dd"), 0)) == [r["text"] for r in ROWS[:4]]
    with pytest.raises(UserError, match=r"datasets\[0\]\.split: 'dev' not in"):
        load_source(resolve_source(ds(tmp_path / "dd", split="dev"), 0))


# --------------------------------------------------------------------------- exact JSON, unreadable lines

MIXED = [*({"messages": [{"role": "user", "content": "say hi"}, {"role": "assistant", "content": "hi"}]}
           for _ in range(10)),
         {"messages": [{"role": "user", "content": "what is 6*8?"}, {"role": "assistant", "content": "48"}]},
         {"messages": [{"role": "user", "content": "null"}, {"role": "assistant", "content": '"quoted"'}]},
         {"messages": [{"role": "user", "content": [{"type": "text", "text": "hello"}]},
                       {"role": "assistant", "content": "hey"}]}]


def test_json_object_of_columns_is_read_by_rows(tmp_path):
    path = tmp_path / "columns.json"  # json.dump(dict of lists, indent=2): what `datasets` reads as columns
    path.write_text(json.dumps({"text": [r["text"] for r in ROWS], "n": [r["n"] for r in ROWS]}, indent=2))
    assert texts(resolve_source(ds(path), 0)) == [r["text"] for r in ROWS]
    one_line = tmp_path / "one.json"  # a single-line object is JSON Lines: one row
    one_line.write_text(json.dumps({"text": "only"}) + "\n")
    assert texts(resolve_source(ds(one_line), 0)) == ["only"]
    ragged = tmp_path / "ragged.json"
    ragged.write_text(json.dumps({"text": ["a", "b"], "n": [1]}, indent=2))
    with pytest.raises(UserError, match="equal-length lists"):
        load_source(resolve_source(ds(ragged), 0))


@pytest.mark.parametrize("ext", ["jsonl", "json"])
def test_mixed_type_columns_keep_every_string_exactly(tmp_path, ext):
    # The datasets JSON builder stores such a column as JSON and decodes "48" -> 48, "null" -> None.
    path = tmp_path / f"mixed.{ext}"
    path.write_text(json.dumps(MIXED) if ext == "json" else "".join(json.dumps(r) + "\n" for r in MIXED))
    rows = load_source(resolve_source(ds(path), 0))
    assert len(rows) == len(MIXED) and rows.column_names == ["messages"]
    assert rows["messages"] == [r["messages"] for r in MIXED]
    assert rows[10]["messages"][1]["content"] == "48" and rows[11]["messages"][0]["content"] == "null"


def test_unreadable_lines_name_the_file_line_and_reason(tmp_path):
    good = json.dumps({"text": "ok"}) + "\n"
    cases = {
        "utf8.jsonl": (good * 3).encode() + b'{"text": "h\xff\xfei"}\n',
        "json.jsonl": (good * 10 + '{"text": "a" "b"}\n').encode(),
        "list.jsonl": (good + "[1, 2]\n").encode(),
        "bytes.txt": b"hello\n\xff\xfe world\n",
        "array.json": b'[{"text": "a"},\n {"text": }]',
    }
    expected = {"utf8.jsonl": r"line 4: not valid UTF-8 text \(byte 0xff at column 12\)",
                "json.jsonl": r"line 11: invalid JSON \(Expecting ',' delimiter at column 14\)",
                "list.jsonl": "line 2: expected a JSON object, got list",
                "bytes.txt": r"line 2: not valid UTF-8 text \(byte 0xff at column 1\)",
                "array.json": r"line 2: invalid JSON \(Expecting value at column 11\)"}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(UserError, match=rf"datasets\[0\]\.path: could not load '.*{name}': {expected[name]}"):
            load_source(resolve_source(ds(tmp_path / name), 0))


def test_unreadable_lines_are_bad_rows_when_skipping(tmp_path):
    from surogate.runtime.data.errors import BadRow

    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "a"}\n\n{"text": "h\xffi"}\n{"text": "c"}\n')
    rows = load_source(resolve_source(ds(path), 0), on_bad_row="skip")
    assert len(rows) == 3 and rows["text"] == ["a", None, "c"]  # the blank line is not a row
    assert isinstance(rows[1], BadRow) and "line 3: not valid UTF-8" in rows[1].problem and "d.jsonl" in rows[1].problem
    (tmp_path / "all_bad.jsonl").write_bytes(b"{oops\n")
    with pytest.raises(UserError, match=r"no readable rows; the first: .*line 1: invalid JSON"):
        load_source(resolve_source(ds(tmp_path / "all_bad.jsonl"), 0), on_bad_row="skip")


@pytest.mark.parametrize("name, data", [("empty.jsonl", b""), ("blank.jsonl", b"\n  \n"), ("empty.txt", b""),
                                        ("empty.json", b"[]")])
def test_empty_file_is_a_clear_error(tmp_path, name, data):
    (tmp_path / name).write_bytes(data)
    with pytest.raises(UserError, match=rf"could not load '.*{name}': file is empty \(no rows\)"):
        load_source(resolve_source(ds(tmp_path / name), 0))


def test_datasets_errors_keep_their_cause(tmp_path):
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n3,4,5,6\n")
    with pytest.raises(UserError, match=r"could not load '.*bad\.csv': ParserError: .*line 3"):
        load_source(resolve_source(ds(tmp_path / "bad.csv"), 0))


def test_glob_patterns_read_every_data_file_they_match(tmp_path):
    # a pattern was "file or folder ... does not exist" even when it matched files (found by fuzzing)
    write_jsonl(tmp_path / "a" / "one.jsonl", ROWS[:2])
    write_jsonl(tmp_path / "a" / "deep" / "two.jsonl", ROWS[2:5])
    (tmp_path / "a" / "notes.md").write_text("not data")
    source = resolve_source(ds(tmp_path / "a" / "**" / "*"), 0)
    assert source.kind == "local" and [p.rsplit("/", 1)[1] for p in source.files] == ["two.jsonl", "one.jsonl"]
    assert texts(source) == [r["text"] for r in ROWS[2:5] + ROWS[:2]]
    assert resolve_source(ds(tmp_path / "a" / "*.jsonl", split="test"), 0).notes == (
        "datasets[0].split: 'test' has no effect: a glob pattern's files are all read",)
    with pytest.raises(UserError, match=r"datasets\[0\]\.path: the pattern '.*\*\.parquet' matches no data files"):
        resolve_source(ds(tmp_path / "a" / "*.parquet"), 0)
    with pytest.raises(UserError, match=r"matches no data files .* \(it matches 1 path\(s\), none a data file\)"):
        resolve_source(ds(tmp_path / "a" / "*.md"), 0)


def test_a_path_that_is_not_a_file_or_folder_is_named_as_such():
    with pytest.raises(UserError, match=r"datasets\[0\]\.path: '/dev/null' is not a regular file or a folder"):
        resolve_source(ds("/dev/null"), 0)  # it said "does not exist"


def test_csv_cells_are_read_as_the_text_written(tmp_path):
    # pandas' type inference turned "007" into 7.0 and "null"/"NA"/"" into null (found by fuzzing)
    cells = [["007", "48"], ["null", "NA"], ["", "1.50"], ["a,b", "true"]]
    path = tmp_path / "exact.csv"
    with path.open("w", newline="", encoding="utf-8-sig") as f:  # with a byte-order mark, as Excel writes
        import csv

        csv.writer(f).writerows([["text", "output"], *cells])
    loaded = load_source(resolve_source(ds(path), 0))
    assert loaded["text"] == [c[0] for c in cells]
    assert loaded["output"] == [c[1] for c in cells]


def test_text_files_keep_lines_exactly_and_samples_stop_the_scan(tmp_path):
    path = tmp_path / "c.txt"
    path.write_bytes(b"\xef\xbb\xbffirst\r\n\nthird \n{\"not\": \"json\"}")
    assert texts(resolve_source(ds(path), 0)) == ["first", "", "third ", '{"not": "json"}']
    assert texts(resolve_source(ds(path, samples=2), 0)) == ["first", ""]


def test_json_columns_from_the_datasets_library_are_reported(tmp_path, caplog):
    import datasets

    saved = datasets.Dataset.from_dict({"a": [[{"b": 0}, {"c": 0}]]}, features=datasets.Features(
        {"a": datasets.List(datasets.Json())}))
    saved.save_to_disk(str(tmp_path / "saved"))
    with caplog.at_level("WARNING", logger="surogate.data"):
        load_source(resolve_source(ds(tmp_path / "saved"), 0))
    assert "stored a[] as JSON" in caplog.text
