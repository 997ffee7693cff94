"""The content hash a checkpoint records of its tokenized data (runtime/run_identity.py) is computed when the
cache entry is written and read back with it: a run from the cache does not read every token again, and gets the
hash a fresh computation gives."""

from __future__ import annotations

import json

import numpy as np

from surogate.runtime.data.split import TokenizedSplit


def _split(tokens: list[list[int]]) -> TokenizedSplit:
    docs = [(np.array(t, dtype=np.int32), np.ones(len(t), dtype=np.uint8)) for t in tokens]
    rows = (np.array([0, 1, len(docs)], dtype=np.int64), np.arange(len(docs), dtype=np.int64))
    return TokenizedSplit.from_docs(docs, rows, seq_len=8, pad_token_id=0, padding_side="right")


def test_the_hash_is_kept_with_the_cache_entry_and_equals_a_fresh_one(tmp_path, monkeypatch):
    split = _split([[5, 6, 7], [8, 9]])
    split.save(tmp_path)
    assert json.loads((tmp_path / "split.json").read_text())["sha256"] == split.content_sha256()
    loaded = TokenizedSplit.load(tmp_path)
    assert loaded.stored_sha256 == split.content_sha256()
    fresh = TokenizedSplit.load(tmp_path)
    fresh.stored_sha256 = None  # an entry written before the hash was kept: computed from the arrays
    assert fresh.content_sha256() == split.content_sha256()
    meta = json.loads((tmp_path / "split.json").read_text())
    del meta["sha256"]
    (tmp_path / "split.json").write_text(json.dumps(meta))
    assert TokenizedSplit.load(tmp_path).content_sha256() == split.content_sha256()


def test_any_changed_token_or_layout_changes_the_hash():
    base = _split([[5, 6, 7], [8, 9]]).content_sha256()
    assert _split([[5, 6, 7], [8, 10]]).content_sha256() != base
    assert _split([[8, 9], [5, 6, 7]]).content_sha256() != base
    other = _split([[5, 6, 7], [8, 9]])
    other.seq_len = 16
    assert other.content_sha256() != base
