"""prepare_datasets end to end: mixed datasets, splits, seeds, cache reuse, workers, bad rows (pipeline.py)."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import numpy as np
import pytest

from surogate.errors import UserError
from surogate.runtime.data import DataError, data_options, load_tokenizer, prepare_datasets
from surogate.runtime.data.encode import Encoder
from tests.data.conftest import conv, make_cfg, write_jsonl

CONVS = [conv(f"hello world {i}", f"how are you today {i}") for i in range(12)]


def all_tokens(split):
    return np.asarray(split.tokens).tolist()


def decoded_docs(tok, split):
    return [tok.decode(split.tokens[a:b]) for a, b in zip(split.doc_offsets[:-1], split.doc_offsets[1:], strict=True)]


@pytest.fixture
def conv_file(tmp_path):
    return write_jsonl(tmp_path / "conv.jsonl", CONVS)


def prepare(cfg, **kw):
    return prepare_datasets(cfg, load_tokenizer(cfg), **kw)


def test_mixed_datasets_of_every_type(tmp_path, model_dir):
    sharegpt = write_jsonl(tmp_path / "sg.jsonl", [
        {"conversations": [{"from": "human", "value": "tell me a joke"}, {"from": "gpt", "value": "cats"}]}] * 3)
    (tmp_path / "inst.csv").write_text("q,a\nwhat is the capital,paris\none two,three\n")
    (tmp_path / "corpus.txt").write_text("the quick brown fox\n\nthe lazy dog\n")
    cfg = make_cfg(tmp_path, model_dir(), [
        {"path": sharegpt, "type": "auto"},
        {"path": str(tmp_path / "inst.csv"), "type": "instruction", "instruction_field": "q", "output_field": "a"},
        {"path": str(tmp_path / "corpus.txt"), "type": "text"}])
    data = prepare(cfg)
    tok = load_tokenizer(cfg)
    docs = decoded_docs(tok, data.train)
    assert sum("tell me a joke" in d for d in docs) == 3
    assert any(d.endswith("paris<|im_end|>\n") for d in docs)
    assert "the quick brown fox</s>" in docs and "the lazy dog</s>" in docs
    stats = data.stats
    assert stats.train.rows_in == 3 + 2 + 3 and stats.train.docs == 7
    assert stats.counts["skipped_empty_text"] == 1  # the blank line of corpus.txt
    assert any("type conversation" in d and "ShareGPT" in d for d in stats.detected)
    assert data.eval is None and stats.template == "tokenizer"
    assert 0 < stats.train.efficiency <= 1


def test_validation_split_ratio_is_seeded(tmp_path, model_dir, conv_file):
    model = model_dir()
    splits = {}
    for seed in (1, 1, 2):
        cfg = make_cfg(tmp_path, model, [{"path": conv_file, "type": "conversation"}],
                       validation_split_ratio=0.25, eval_seed=seed)
        data = prepare(cfg, use_cache=False)
        assert data.stats.train.rows_in == 9 and data.stats.eval.rows_in == 3
        splits.setdefault(seed, []).append(all_tokens(data.eval))
    assert splits[1][0] == splits[1][1] and splits[1][0] != splits[2][0]


def test_validation_datasets_replace_the_ratio(tmp_path, model_dir, conv_file):
    val = write_jsonl(tmp_path / "val.jsonl", [conv("what is the capital", "paris")])
    cfg = make_cfg(tmp_path, model_dir(), [{"path": conv_file, "type": "conversation"}],
                   validation_datasets=[{"path": val, "type": "conversation"}], validation_split_ratio=0.5)
    data = prepare(cfg)
    assert data.stats.train.rows_in == 12 and data.stats.eval.rows_in == 1
    assert "paris" in load_tokenizer(cfg).decode(data.eval.tokens)


def test_second_run_reuses_the_cache_without_tokenizing(tmp_path, model_dir, conv_file, monkeypatch):
    cfg = make_cfg(tmp_path, model_dir(), [{"path": conv_file, "type": "conversation"}])
    first = prepare(cfg)
    assert not first.stats.from_cache and first.stats.rows_tokenized == 12

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(Encoder, "encode_rows", no_tokenizing)
    again = prepare(make_cfg(tmp_path, model_dir(), [{"path": conv_file, "type": "conversation"}], train_seed=99))
    assert again.stats.from_cache and again.stats.rows_tokenized == 0
    assert all_tokens(again.train) == all_tokens(first.train)
    assert again.stats.cache_dir == first.stats.cache_dir and again.stats.cache_dir.startswith(str(tmp_path / "out"))
    with pytest.raises(AssertionError, match="tokenized again"):  # an option that changes tokens: new key
        prepare(make_cfg(tmp_path, model_dir(), [{"path": conv_file, "type": "conversation"}], loss_scale="all"))
    write_jsonl(tmp_path / "conv.jsonl", CONVS[:5])  # the data changed: new key
    with pytest.raises(AssertionError, match="tokenized again"):
        prepare(cfg)


def test_cache_under_worker_output_dir_per_node(tmp_path, model_dir, conv_file):
    cfg = make_cfg(tmp_path, model_dir(), [{"path": conv_file, "type": "conversation"}],
                   distributed={"worker_output_dir": str(tmp_path / "shared")})
    data = prepare(cfg, rank=1)
    assert data.stats.cache_dir.startswith(str(tmp_path / "shared" / "node-1" / "tokenized"))
    assert not list((tmp_path / "shared" / "node-1" / "tokenized").glob(".*tmp*"))  # no leftovers


def test_worker_processes_give_the_same_result(tmp_path, model_dir, conv_file):
    model = model_dir()
    serial = prepare(make_cfg(tmp_path, model, [{"path": conv_file, "type": "conversation"}]), use_cache=False)
    parallel = prepare(make_cfg(tmp_path, model, [{"path": conv_file, "type": "conversation"}],
                                dataloader_num_workers=2), use_cache=False, chunk_size=3)
    assert all_tokens(parallel.train) == all_tokens(serial.train)
    assert np.array_equal(parallel.train.loss_mask, serial.train.loss_mask)
    assert parallel.stats.num_workers == 2


def test_bad_row_in_a_worker_surfaces_as_the_same_clear_error(tmp_path, model_dir):
    rows = list(CONVS)
    rows[7] = {"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]}
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    cfg = make_cfg(tmp_path, model_dir(), [{"path": path, "type": "conversation"}], dataloader_num_workers=2)
    with pytest.raises(DataError) as info:
        prepare(cfg, chunk_size=3)
    assert info.value.row == 7 and info.value.field == "messages[1].role"
    assert "bad.jsonl" in str(info.value) and "unknown role 'robot'" in str(info.value)


def test_skipping_bad_rows_counts_and_reports_them(tmp_path, model_dir):
    rows = list(CONVS)
    rows[2] = {"messages": []}
    rows[5] = {"messages": [{"role": "user", "content": "no answer"}]}
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    data = prepare(make_cfg(tmp_path, model_dir(), [{"path": path, "type": "conversation"}]), on_bad_row="skip")
    assert data.stats.train.docs == 10
    assert data.stats.counts["skipped_empty_conversation"] == 1
    assert data.stats.counts["skipped_no_trainable_tokens"] == 1
    assert any("row 2" in s for s in data.stats.skipped_examples)


@pytest.mark.parametrize("strategy, docs, key", [("delete", 0, "deleted_too_long"), ("left", 2, "truncated_left"),
                                                 ("right", 2, "truncated_right"), ("split", None, "split_docs")])
def test_truncation_strategies_through_the_pipeline(tmp_path, model_dir, strategy, docs, key):
    long = conv("hello world", "how are you today " * 10)  # the answer survives either cut
    path = write_jsonl(tmp_path / "long.jsonl", [long, long, conv("hi", "yo")])
    cfg = make_cfg(tmp_path, model_dir(), [{"path": path, "type": "conversation"}], truncation_strategy=strategy,
                   max_length=32)
    data = prepare(cfg)
    assert data.stats.counts[key] == 2
    assert int(data.train.doc_lengths().max()) <= 32
    if docs is not None:
        assert data.stats.train.docs == docs + 1
    else:
        assert data.stats.train.docs == data.stats.counts["split_chunks"] + 1 - \
            data.stats.counts.get("dropped_no_trainable_after_truncation", 0)


def test_long_text_rows_are_truncated_where_conversations_are_deleted(tmp_path, model_dir):
    """The default truncation_strategy (delete) is the contract's rule for conversations; text samples follow
    sequence_len's "truncated": cut on the right, the first max_length tokens kept."""
    long_text = {"text": " ".join(f"w{i % 50}" for i in range(200))}
    text = write_jsonl(tmp_path / "text.jsonl", [long_text, {"text": "w1 w2 w3"}])
    chat = write_jsonl(tmp_path / "chat.jsonl", [conv("hello world", "how are you today " * 10), conv("hi", "yo")])
    cfg = make_cfg(tmp_path, model_dir(), [{"path": text, "type": "text"}, {"path": chat, "type": "conversation"}],
                   max_length=32, validation_split_ratio=0.0)
    data = prepare(cfg, use_cache=False)
    assert data.stats.counts["truncated_right"] == 1 and data.stats.counts["deleted_too_long"] == 1
    assert data.stats.train.docs == 3 and int(data.train.doc_lengths().max()) == 32
    tok = load_tokenizer(cfg)
    kept = [doc for doc in decoded_docs(tok, data.train) if "w0 w1 w2" in doc]
    assert len(kept) == 1 and 20 < len(kept[0]) < len(long_text["text"])
    assert long_text["text"].startswith(kept[0].strip())  # the head kept


@pytest.mark.parametrize("template", ["{% for i in range(10**9) %}x{% endfor %}",  # the sandbox's range limit
                                      "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",  # endless recursion
                                      "{{ messages[99].content }}"])  # no such message
def test_a_chat_template_failing_on_a_row_is_a_data_error_naming_it(tmp_path, model_dir, conv_file, template):
    with pytest.raises(DataError, match=r"row 0, field 'messages': the chat template could not render this row"):
        prepare(make_cfg(tmp_path, model_dir(), [{"path": conv_file, "type": "conversation"}], template=template),
                use_cache=False)


def test_every_row_deleted_is_an_error(tmp_path, model_dir):
    path = write_jsonl(tmp_path / "long.jsonl", [conv("hello world " * 20, "how are you " * 20)])
    with pytest.raises(UserError, match="no training documents left"):
        prepare(make_cfg(tmp_path, model_dir(), [{"path": path, "type": "conversation"}], max_length=16))


def test_packing_modes(tmp_path, model_dir, conv_file):
    model = model_dir()
    ds = [{"path": conv_file, "type": "conversation"}]
    packed = prepare(make_cfg(tmp_path, model, ds), use_cache=False)
    unpacked = prepare(make_cfg(tmp_path, model, ds, sample_packing=False), use_cache=False)
    free = prepare(make_cfg(tmp_path, model, ds, sample_packing=False, padding_free=True), use_cache=False)
    assert unpacked.train.num_rows == 12 and unpacked.train.max_docs_per_row == 1
    assert packed.train.num_rows < 12 and free.train.num_rows < 12
    assert packed.stats.train.efficiency > unpacked.stats.train.efficiency
    # padding-free keeps dataset order inside rows
    assert free.train.row_docs.tolist() == list(range(12))


def test_config_errors(tmp_path, model_dir, conv_file):
    model = model_dir()
    with pytest.raises(UserError, match="datasets: must list at least 1 item"):  # the schema says it first
        prepare(make_cfg(tmp_path, model, []))
    with pytest.raises(UserError, match=r"max_length: 128 is larger than sequence_len \(64\)"):
        data_options(SimpleNamespace(sequence_len=64, max_length=128))  # the schema rejects it too
    with pytest.raises(UserError, match="agent_template: got 'x'; expected one of: 'hermes', 'react_en'"):  # the schema
        prepare(make_cfg(tmp_path, model, [{"path": conv_file, "type": "conversation"}], agent_template="x"))
    with pytest.raises(UserError, match=r"model: folder '/nonexistent/model' does not exist"):
        load_tokenizer(make_cfg(tmp_path, "/nonexistent/model", [{"path": conv_file, "type": "conversation"}]))


def test_tool_rows_loaded_through_arrow_render_without_null_filled_keys(tmp_path, model_dir):
    def row(name, args):
        return {"messages": [
            {"role": "user", "content": "weather"},
            {"role": "assistant", "content": "", "tool_calls": [{"type": "function",
                                                                 "function": {"name": name, "arguments": args}}]},
            {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "ok"}],
            "tools": [{"type": "function", "function": {"name": name, "parameters": {"type": "object"}}}]}

    path = write_jsonl(tmp_path / "tools.jsonl", [row("get_weather", {"city": "paris"}), row("get_time", {"zone": "utc"})])
    cfg = make_cfg(tmp_path, model_dir(), [{"path": path, "type": "conversation", "tools_field": "tools"}],
                   template="qwen", sequence_len=512)
    data = prepare(cfg)
    text = load_tokenizer(cfg).decode(data.train.tokens)
    assert '{"name": "get_weather", "arguments": {"city": "paris"}}' in text
    assert '{"name": "get_time", "arguments": {"zone": "utc"}}' in text
    assert "null" not in text and "<tools>" in text


def test_a_cache_built_skipping_bad_rows_does_not_hide_them_from_a_strict_run(tmp_path, model_dir):
    path = write_jsonl(tmp_path / "bad.jsonl", [*CONVS[:3], {"messages": []}])
    cfg = make_cfg(tmp_path, model_dir(), [{"path": path, "type": "conversation"}])
    assert prepare(cfg, on_bad_row="skip").stats.counts["skipped_empty_conversation"] == 1
    with pytest.raises(DataError, match="row 3"):
        prepare(cfg)


def test_two_runs_give_identical_data_and_batches(tmp_path, model_dir, conv_file):
    model = model_dir()
    runs = [prepare(make_cfg(tmp_path, model, [{"path": conv_file, "type": "conversation"}],
                             validation_split_ratio=0.2), use_cache=False) for _ in range(2)]
    for name in ("tokens", "loss_mask", "doc_offsets", "row_offsets", "row_docs"):
        assert np.array_equal(getattr(runs[0].train, name), getattr(runs[1].train, name))
    first, second = (list(r.train.batches(2, epoch=1, seed=1234)) for r in runs)
    assert all((a["input_ids"] == b["input_ids"]).all() for a, b in zip(first, second, strict=True))


@pytest.mark.parametrize("answer", ["48", "null"])
def test_strings_that_look_like_json_are_trained_on_as_written(tmp_path, model_dir, answer):
    # One row with content parts makes `messages` a mixed-type column; its strings must not be decoded
    # (the datasets JSON builder turned "48" into 48 -> an error on a valid row, and "null" into "").
    rows = [*CONVS[:10], conv("what is six times eight", answer),
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "hello"}]},
                          {"role": "assistant", "content": "hey"}]}]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    cfg = make_cfg(tmp_path, model_dir(), [{"path": path, "type": "conversation"}])
    docs = decoded_docs(load_tokenizer(cfg), prepare(cfg).train)
    assert any(f"six times eight<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>" in d for d in docs)
    assert any("user\nhello<|im_end|>" in d for d in docs)


def test_unreadable_line_is_an_error_or_a_skipped_row(tmp_path, model_dir):
    path = tmp_path / "bytes.jsonl"
    good = [(json.dumps(r) + "\n").encode() for r in CONVS[:4]]
    path.write_bytes(b"".join(good[:2]) + b'{"messages": [{"role": "user", "content": "h\xff\xfei"}]}\n' +
                     b"".join(good[2:]))
    cfg = make_cfg(tmp_path, model_dir(), [{"path": str(path), "type": "conversation"}])
    with pytest.raises(UserError, match=r"could not load '.*bytes\.jsonl': line 3: not valid UTF-8"):
        prepare(cfg)
    data = prepare(cfg, on_bad_row="skip")
    assert data.stats.counts["skipped_invalid_utf8"] == 1 and data.stats.train.docs == 4
    assert any("row 2" in s and "line 3" in s for s in data.stats.skipped_examples)


LONE_SURROGATE = b'{"messages": [{"role": "user", "content": "hi \\ud800 there"}, {"role": "assistant", "content": "ok"}]}'
TOO_DEEP = b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"


@pytest.mark.parametrize("line, words, reason", [
    (LONE_SURROGATE, r"a string holds the escape \\ud800, a lone UTF-16 surrogate", "invalid_text"),  # TypeError
    (TOO_DEEP, r"invalid JSON \(nested too deeply to read\)", "invalid_json"),  # RecursionError
])
def test_rows_no_tokenizer_can_read_are_an_error_or_a_skipped_row(tmp_path, model_dir, line, words, reason):
    path = tmp_path / "rows.jsonl"
    good = [(json.dumps(r) + "\n").encode() for r in CONVS[:4]]
    path.write_bytes(b"".join(good[:2]) + line + b"\n" + b"".join(good[2:]))
    cfg = make_cfg(tmp_path, model_dir(), [{"path": str(path), "type": "conversation"}])
    with pytest.raises(UserError, match=r"could not load '.*rows\.jsonl': line 3: " + words):
        prepare(cfg)
    data = prepare(cfg, on_bad_row="skip")  # the tokenizer's TypeError was raised with --skip-bad-rows too
    assert data.stats.counts[f"skipped_{reason}"] == 1 and data.stats.train.docs == 4
    assert any("row 2" in s and "line 3" in s for s in data.stats.skipped_examples)


@pytest.mark.parametrize("body, words", [
    (b"[" + LONE_SURROGATE + b"]", r"item 0: a string holds the escape \\ud800"),
    (b'{"messages":\n [[{"role": "user", "content": "\\udfff"}]]}', r"item 0: a string holds the escape \\udfff"),
    (b"[" + TOO_DEEP + b"]", r"invalid JSON \(nested too deeply to read\)"),
    (TOO_DEEP, r"invalid JSON \(nested too deeply to read\)"),  # its first line was parsed to tell the layout
])
def test_json_documents_with_unreadable_rows_name_the_file(tmp_path, model_dir, body, words):
    path = tmp_path / "doc.json"
    path.write_bytes(body)
    cfg = make_cfg(tmp_path, model_dir(), [{"path": str(path), "type": "conversation"}])
    with pytest.raises(UserError, match=r"could not load '.*doc\.json': " + words):
        prepare(cfg)


def test_escaped_surrogate_pairs_are_text(tmp_path, model_dir):
    rows = b"".join((json.dumps(r) + "\n").encode() for r in CONVS[:4])
    pair = b'{"messages": [{"role": "user", "content": "smile \\ud83d\\ude00"}, {"role": "assistant", "content": "ok"}]}'
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(rows + pair + b"\n")
    cfg = make_cfg(tmp_path, model_dir(), [{"path": str(path), "type": "conversation"}])
    data = prepare(cfg)
    assert data.stats.train.docs + (data.stats.eval.docs if data.stats.eval else 0) == 5


@pytest.mark.parametrize("name, size", [("doc_offsets.npy", 50), ("tokens.npy", 200), ("split.json", 3)])
def test_a_broken_cache_entry_is_rebuilt_with_a_warning(tmp_path, model_dir, conv_file, caplog, name, size):
    cfg = make_cfg(tmp_path, model_dir(), [{"path": conv_file, "type": "conversation"}])
    first = prepare(cfg)
    expected = all_tokens(first.train)  # read now: `first` maps the files about to be truncated
    with open(f"{first.stats.cache_dir}/train/{name}", "r+b") as f:
        f.truncate(size)
    with caplog.at_level("WARNING", logger="surogate.data"):
        again = prepare(cfg)
    assert "is broken" in caplog.text and "rebuilding it" in caplog.text
    assert not again.stats.from_cache and all_tokens(again.train) == expected
    assert prepare(cfg).stats.from_cache  # the rebuilt entry is whole again


def test_an_edited_cache_entry_is_rebuilt_not_trusted(tmp_path, model_dir, conv_file, caplog):
    # The statistics' largest token id (checked against the model's vocab before training) describes the tokens as
    # written: an out-of-vocabulary id written into tokens.npy by hand passed that check and crashed the first
    # micro-step with an IndexError. Same length, valid structure: only the file's signature tells.
    cfg = make_cfg(tmp_path, model_dir(), [{"path": conv_file, "type": "conversation"}])
    first = prepare(cfg)
    expected, top = all_tokens(first.train), first.stats.train.max_token_id
    time.sleep(0.05)  # file times are kept at the kernel's clock tick (a few ms); a hand edit comes later than that
    tokens = np.load(f"{first.stats.cache_dir}/train/tokens.npy", mmap_mode="r+")
    tokens[::3] = 10**6
    tokens.flush()
    del tokens
    with caplog.at_level("WARNING", logger="surogate.data"):
        again = prepare(cfg)
    assert "train/tokens.npy changed since the entry was written" in caplog.text and "rebuilding it" in caplog.text
    assert not again.stats.from_cache and all_tokens(again.train) == expected and again.stats.train.max_token_id == top
    assert prepare(cfg).stats.from_cache  # the rebuilt entry is trusted again


def test_unusable_output_dir_is_a_user_error_naming_it(tmp_path, model_dir, conv_file):
    (tmp_path / "a_file").write_text("x")
    ds = [{"path": conv_file, "type": "conversation"}]
    with pytest.raises(UserError, match=r"^output_dir: cannot create the tokenized-data folder .*a_file/tokenized "
                                        r"\(a file is in the way\)"):
        prepare(make_cfg(tmp_path, model_dir(), ds, output_dir=str(tmp_path / "a_file")))
    with pytest.raises(UserError, match=r"^distributed\.worker_output_dir: cannot create the tokenized-data folder"):
        prepare(make_cfg(tmp_path, model_dir(), ds, distributed={"worker_output_dir": "/proc/x"}))
    assert prepare(make_cfg(tmp_path, model_dir(), ds, output_dir=str(tmp_path / "a_file")), use_cache=False)


def test_chat_options_shape_prompt_formats_or_are_said_to_do_nothing(tmp_path, model_dir):
    # system / response_prefix were dropped silently for prompt_format instructions and raw text (found by fuzzing)
    model = model_dir()
    rows = [{"q": "add two", "a": "four"}] * 3
    instr = [{"path": write_jsonl(tmp_path / "i.jsonl", rows), "type": "instruction", "instruction_field": "q",
              "output_field": "a"}]
    data = prepare(make_cfg(tmp_path, model, instr, use_chat_template=False, system="Be brief.",
                            response_prefix="Sure: "), use_cache=False)
    tok = load_tokenizer(make_cfg(tmp_path, model, instr))
    tokens, mask = data.train.tokens, data.train.loss_mask
    end = int(data.train.doc_offsets[1])
    text = tok.decode(tokens[:end])
    assert text.startswith("Be brief.\n\n### Instruction:\nadd two") and "### Response:\nSure: four" in text
    trained = tok.decode([t for t, m in zip(tokens[:end], mask[:end], strict=True) if m])
    assert "Sure" not in trained and trained.strip().startswith("four")  # the prefix is prompt, not target
    assert data.stats.source_notes == []

    text_ds = [{"path": write_jsonl(tmp_path / "t.jsonl", [{"text": "hello world"}] * 3), "type": "text"}]
    cfg = make_cfg(tmp_path, model, text_ds, system="Be brief.", response_prefix="Sure: ", loss_scale="last_round")
    expected = [f"{name}: {value!r} has no effect: every dataset is raw text (type: text), trained on every token"
                for name, value in (("system", "Be brief."), ("response_prefix", "Sure: "), ("loss_scale", "last_round"))]
    assert prepare(cfg).stats.source_notes == expected
    again = prepare(cfg)
    assert again.stats.from_cache and again.stats.source_notes == expected  # a cache hit says it too
