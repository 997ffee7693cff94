"""Tokenized cache: location, key stability, atomic writes (cache.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from surogate.runtime.data.cache import (
    cache_key,
    cache_root,
    entry_ready,
    tokenizer_fingerprint,
    write_atomic,
)


def cfg(**dist):
    return SimpleNamespace(output_dir="/o", run_name="r1", distributed=SimpleNamespace(
        worker_output_dir=dist.get("worker_output_dir"), num_nodes=dist.get("num_nodes", 1)))


def test_cache_root_per_node():
    assert str(cache_root(cfg())) == "/o/tokenized"
    assert str(cache_root(cfg(worker_output_dir="/shared"), rank=3)) == "/shared/node-3/tokenized"
    assert str(cache_root(cfg(num_nodes=2), rank=1)) == "/tmp/surogate-r1/node-1/tokenized"


def test_key_is_stable_and_sensitive():
    a = cache_key({"x": [1, 2], "y": {"b": 1, "a": 2}})
    assert a == cache_key({"y": {"a": 2, "b": 1}, "x": [1, 2]})
    assert a != cache_key({"x": [1, 3], "y": {"b": 1, "a": 2}})


def test_tokenizer_fingerprint_sees_the_chat_template(tokenizer_factory):
    assert tokenizer_fingerprint(tokenizer_factory(None)) != tokenizer_fingerprint(tokenizer_factory("{{ x }}"))


def test_atomic_write_leaves_nothing_on_failure_and_keeps_the_first_writer(tmp_path):
    target = tmp_path / "entry"

    def broken(folder):
        (folder / "half").write_text("x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_atomic(target, broken)
    assert not target.exists() and list(tmp_path.iterdir()) == []
    write_atomic(target, lambda f: (f / "stats.json").write_text("first"))
    write_atomic(target, lambda f: (f / "stats.json").write_text("second"))  # lost race: first copy stays
    assert entry_ready(target) and (target / "stats.json").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["entry"]
