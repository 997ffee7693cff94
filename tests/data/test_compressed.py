"""Compressed data files (.jsonl.gz, .json.bz2, .csv.xz, .txt.gz, ...): read as their plain form is, with bad
rows, `samples`, --skip-bad-rows, the tokenized cache and clear errors for data that does not decompress
(filekinds.py, linefiles.py, sources.py)."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from surogate.cli import main
from surogate.errors import UserError
from surogate.runtime.data.errors import BadRow
from surogate.runtime.data.sources import file_fingerprint, load_source, resolve_source
from tests.data.conftest import conv, make_cfg
from tests.data.test_pipeline import all_tokens, prepare

COMPRESS = {".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress}
RNG = random.Random(7)
ROWS = [{"text": " ".join(RNG.choice(["alpha", "beta", "007", "null", "ünï"]) for _ in range(6)), "n": str(i)}
        for i in range(40)]


def ds(path, samples=None, split="train"):
    return SimpleNamespace(path=str(path), subset=None, split=split, samples=samples)


def plain_bytes(ext: str, rows: list[dict] = ROWS) -> bytes:
    if ext == ".jsonl":
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    if ext == ".json":
        return json.dumps(rows, indent=1).encode()
    if ext == ".csv":
        return ("text,n\n" + "".join(f"{r['text']},{r['n']}\n" for r in rows)).encode()
    return "".join(r["text"] + "\n" for r in rows).encode()  # .txt


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(COMPRESS[path.suffix](data) if path.suffix in COMPRESS else data)
    return path


def rows_of(path: Path, on_bad_row: str = "error", **kw) -> list[dict]:
    loaded = load_source(resolve_source(ds(path, **kw), 0), on_bad_row)
    return [dict(r) if not isinstance(r, BadRow) else r for r in (loaded[i] for i in range(len(loaded)))]


@pytest.mark.parametrize("compression", [".gz", ".bz2", ".xz"])
@pytest.mark.parametrize("ext", [".jsonl", ".json", ".csv", ".txt"])
def test_compressed_files_give_the_rows_of_the_plain_file(tmp_path, ext, compression):
    data = plain_bytes(ext)
    plain = write(tmp_path / f"plain{ext}", data)
    packed = write(tmp_path / f"packed{ext}{compression}", data)
    source = resolve_source(ds(packed), 0)
    assert source.builder == resolve_source(ds(plain), 0).builder
    assert rows_of(packed) == rows_of(plain) and len(rows_of(packed)) == len(ROWS)
    assert rows_of(packed, samples=3) == rows_of(plain)[:3]


def test_chunks_are_read_in_one_pass_and_the_file_closed_at_the_end(tmp_path, monkeypatch):
    from surogate.runtime.data import linefiles

    path = write(tmp_path / "d.jsonl.gz", plain_bytes(".jsonl"))
    loaded = load_source(resolve_source(ds(path), 0))
    opened, real_open = [], linefiles.open_binary
    monkeypatch.setattr(linefiles, "open_binary", lambda p: opened.append(p) or real_open(p))
    chunked = [r for start in range(0, len(loaded), 7) for r in loaded.rows(start, start + 7)]
    assert chunked == [json.loads(line) for line in plain_bytes(".jsonl").splitlines()]
    assert len(opened) == 1  # each chunk goes on where the last ended: the file is not decompressed again
    assert all(part._reader is None for part in loaded._parts)  # the last chunk closed it
    assert loaded.rows(3, 5) == chunked[3:5] and loaded.rows(1, 2) == chunked[1:2]  # backwards: from the start


def test_bad_rows_in_a_compressed_file_name_the_file_and_line(tmp_path):
    lines = plain_bytes(".jsonl").splitlines(keepends=True)
    lines.insert(5, b'{"text": "a" "b"}\n')
    path = write(tmp_path / "bad.jsonl.gz", b"".join(lines))
    with pytest.raises(UserError, match=r"could not load '.*bad\.jsonl\.gz': line 6: invalid JSON"):
        rows_of(path)
    skipped = rows_of(path, on_bad_row="skip")
    assert len(skipped) == len(ROWS) + 1 and isinstance(skipped[5], BadRow)
    assert "bad.jsonl.gz" in skipped[5].problem and "line 6: invalid JSON" in skipped[5].problem
    assert [r for r in skipped if not isinstance(r, BadRow)] == ROWS


def test_folders_and_globs_read_compressed_files(tmp_path):
    write(tmp_path / "d" / "train-0.jsonl.gz", plain_bytes(".jsonl", ROWS[:10]))
    write(tmp_path / "d" / "train-1.jsonl", plain_bytes(".jsonl", ROWS[10:20]))
    write(tmp_path / "d" / "test.jsonl.bz2", plain_bytes(".jsonl", ROWS[20:]))
    assert rows_of(tmp_path / "d") == ROWS[:20]
    assert rows_of(tmp_path / "d", split="test") == ROWS[20:]
    assert rows_of(tmp_path / "d" / "*.gz") == ROWS[:10]
    write(tmp_path / "d" / "train-2.csv.xz", plain_bytes(".csv"))
    with pytest.raises(UserError, match=r"mixes file kinds \(csv, json\)"):
        resolve_source(ds(tmp_path / "d"), 0)


def test_compressed_parquet_or_arrow_is_not_a_data_file(tmp_path):
    (tmp_path / "x.parquet.gz").write_bytes(gzip.compress(b"PAR1"))
    with pytest.raises(UserError, match=r"unsupported file type '\.parquet\.gz'.*also compressed: \.gz"):
        resolve_source(ds(tmp_path / "x.parquet.gz"), 0)
    with pytest.raises(UserError, match="has no data files"):
        resolve_source(ds(tmp_path), 0)
    with pytest.raises(UserError, match=r"file or folder '.*nope\.jsonl\.gz' does not exist"):
        resolve_source(ds(tmp_path / "nope.jsonl.gz"), 0)  # a local path, not a hub id


def _truncated(data: bytes) -> bytes:
    packed = gzip.compress(data)
    return packed[:len(packed) // 2]


def _bad_crc(data: bytes) -> bytes:
    packed = bytearray(gzip.compress(data))
    packed[-8] ^= 0xFF  # the CRC32 in the trailer
    return bytes(packed)


@pytest.mark.parametrize("name, damage, problem", [
    ("cut.jsonl.gz", _truncated, "the gzip data is truncated"),
    ("cut.txt.gz", _truncated, "the gzip data is truncated"),
    ("cut.csv.gz", _truncated, "the gzip data is truncated"),
    ("plain.json.gz", lambda data: data, "not valid gzip data: Not a gzipped file"),
    ("crc.jsonl.gz", _bad_crc, "not valid gzip data: CRC check failed"),
    ("plain.csv.gz", lambda data: data, "not valid gzip data: Not a gzipped file"),
    ("plain.txt.bz2", lambda data: data, "not valid bzip2 data"),
    ("plain.jsonl.xz", lambda data: data, "not valid xz data"),
])
def test_data_that_does_not_decompress_is_an_error_naming_the_file(tmp_path, name, damage, problem):
    ext = "." + name.split(".")[1]
    data = plain_bytes(ext, ROWS * 20)
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / name).write_bytes(damage(data))
    with pytest.raises(UserError, match=rf"could not load '.*{name}': cannot read it \({problem}"):
        load_source(resolve_source(ds(tmp_path / "one" / name), 0))
    write(tmp_path / "one" / f"a-good{ext}.gz", data)  # in a folder, the message names the bad file
    with pytest.raises(UserError, match=rf"could not load '.*one': file '.*{name}' cannot read it \({problem}"):
        load_source(resolve_source(ds(tmp_path / "one"), 0))


def _config(tmp_path: Path, model: str, data: Path) -> str:
    cfg = {"model": model, "output_dir": str(tmp_path / "out"), "sequence_len": 64, "dataloader_num_workers": 0,
           "validation_split_ratio": 0.2, "datasets": [{"path": str(data), "type": "conversation"}]}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_tokenize_a_compressed_file_cache_bad_rows_and_corruption(tmp_path, model_dir, capsys):
    rows = [conv(f"hello {i}", f"world {i}") for i in range(10)]
    data = tmp_path / "chat.jsonl.gz"
    data.write_bytes(gzip.compress(plain_bytes(".jsonl", rows)))
    config = _config(tmp_path, model_dir(), data)
    assert main(["tokenize", config]) == 0
    assert "tokenized 10 rows" in capsys.readouterr().out
    assert main(["tokenize", config]) == 0
    assert "reused from cache" in capsys.readouterr().out
    before = file_fingerprint(resolve_source(ds(data), 0))
    bad = {"messages": [{"role": "alien", "content": "x"}]}
    data.write_bytes(gzip.compress(plain_bytes(".jsonl", [*rows[:3], bad, *rows[3:]])))
    assert file_fingerprint(resolve_source(ds(data), 0)) != before
    assert main(["tokenize", config]) == 2  # not the cache entry of the old file: its new row 3 is bad
    err = capsys.readouterr().err
    assert "chat.jsonl.gz" in err and "row 3" in err and "unknown role 'alien'" in err
    assert main(["tokenize", config, "--skip-bad-rows"]) == 0
    out = capsys.readouterr().out
    assert "tokenized 11 rows" in out and "skipped:" in out
    data.write_bytes(_truncated(plain_bytes(".jsonl", rows * 50)))
    assert main(["tokenize", config]) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    assert captured.err.strip().splitlines() == [
        f"error: datasets[0].path: could not load {str(data)!r}: cannot read it (the gzip data is truncated: "
        "Compressed file ended before the end-of-stream marker was reached)"]


def test_compressed_files_at_urls(tmp_path):
    import fsspec

    fs = fsspec.filesystem("memory")
    with fs.open("/bucket/zipped/part-0.jsonl.gz", "wb") as f:
        f.write(gzip.compress(plain_bytes(".jsonl", ROWS[:5])))
    with fs.open("/bucket/zipped/part-1.jsonl.xz", "wb") as f:
        f.write(lzma.compress(plain_bytes(".jsonl", ROWS[5:])))
    assert rows_of("memory://bucket/zipped") == ROWS
    assert rows_of("memory://bucket/zipped/part-0.jsonl.gz", samples=2) == ROWS[:2]


def test_a_compressed_file_tokenizes_as_the_plain_file_also_in_worker_processes(tmp_path, model_dir):
    rows = [conv(f"hello world {i}", f"how are you today {i}") for i in range(12)]
    plain = write(tmp_path / "c.jsonl", plain_bytes(".jsonl", rows))
    packed = write(tmp_path / "c.jsonl.gz", plain_bytes(".jsonl", rows))
    model = model_dir()
    serial = prepare(make_cfg(tmp_path, model, [{"path": str(plain), "type": "conversation"}]), use_cache=False)
    parallel = prepare(make_cfg(tmp_path, model, [{"path": str(packed), "type": "conversation"}],
                                dataloader_num_workers=2), use_cache=False, chunk_size=3)
    assert parallel.stats.num_workers == 2
    assert all_tokens(parallel.train) == all_tokens(serial.train)
    assert np.array_equal(parallel.train.loss_mask, serial.train.loss_mask)
