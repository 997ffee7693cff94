"""The offline tiny example: generated model/tokenizer/data load in transformers, loss is computable and
falls, and examples/tiny-cpu-sft.yaml validates and points at what the generator writes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from surogate.schema import load_config, validate_file
from tests.scripts import load_script

ROOT = Path(__file__).resolve().parents[2]
YAML = ROOT / "examples" / "tiny-cpu-sft.yaml"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    mod = load_script("examples/tiny/make_tiny.py")
    assert mod.main([str(out), "--rows", "400"]) == 0
    return mod, out


def _encode(tokenizer, rows):
    enc = [tokenizer.apply_chat_template(r["messages"], tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True) for r in rows]
    length = max(len(e["input_ids"]) for e in enc)
    ids = torch.full((len(enc), length), tokenizer.pad_token_id)
    labels = torch.full((len(enc), length), -100)
    mask = torch.zeros(len(enc), length, dtype=torch.long)
    for i, e in enumerate(enc):
        n = len(e["input_ids"])
        x = torch.tensor(e["input_ids"])
        ids[i, :n], mask[i, :n] = x, 1
        labels[i, :n] = torch.where(torch.tensor(e["assistant_masks"]).bool(), x, -100)
    return ids, mask, labels


def test_generator_writes_loadable_model_tokenizer_and_data(tiny):
    mod, out = tiny
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    tok = AutoTokenizer.from_pretrained(out / "model")
    assert model.config.model_type == "qwen3" and model.config.num_hidden_layers == 2
    assert model.config.hidden_size == 64 and model.config.tie_word_embeddings
    assert (out / "model" / "model.safetensors").is_file()
    assert len(tok) <= model.config.vocab_size == mod.VOCAB_SIZE
    rows = [json.loads(line) for line in (out / "data" / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 400
    assert {m["role"] for r in rows for m in r["messages"]} == {"user", "assistant"}
    # each word and number is one token wherever it stands, so "reverse" is a pure copying task
    rev = rows[0]["messages"]
    assert rev[0]["content"].startswith("reverse: ")
    assert rev[1]["content"].split() == rev[0]["content"].removeprefix("reverse: ").split()[::-1]
    assert all(len(tok(w)["input_ids"]) == 1 and len(tok(" " + w)["input_ids"]) == 1 for w in mod.WORDS)
    add = rows[1]["messages"]
    a, b = add[0]["content"].removeprefix("add: ").split(" + ")
    assert int(add[1]["content"]) == int(a) + int(b)


def test_chat_template_masks_only_the_answers(tiny):
    _, out = tiny
    tok = AutoTokenizer.from_pretrained(out / "model")
    msgs = [{"role": "user", "content": "add: 3 + 4"}, {"role": "assistant", "content": "7"}]
    enc = tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    answer = [t for t, m in zip(enc["input_ids"], enc["assistant_masks"], strict=True) if m]
    assert tok.decode(answer) == "7<|im_end|>"
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text == "<|im_start|>user\nadd: 3 + 4<|im_end|>\n<|im_start|>assistant\n7<|im_end|>\n"


def test_loss_is_computable_and_falls(tiny):
    _, out = tiny
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads only add contention on a shared machine
    try:
        _train_a_few_steps(out)
    finally:
        torch.set_num_threads(threads)


def _train_a_few_steps(out):
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    tok = AutoTokenizer.from_pretrained(out / "model")
    rows = [json.loads(line) for line in (out / "data" / "train.jsonl").read_text().splitlines()][:16]
    ids, mask, labels = _encode(tok, rows)
    first = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    # random init: about ln(vocab) per answer token
    assert math.isfinite(first.item()) and abs(first.item() - math.log(model.config.vocab_size)) < 1.0
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(12):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < 0.6 * first.item()


def test_yaml_validates_without_warnings_and_points_at_the_generated_files(tiny):
    mod, _ = tiny
    result = validate_file(YAML)
    assert result.ok, result.errors
    assert not [n for n in result.notices if n.kind == "warning"]
    cfg = load_config(YAML)
    tiny_dir = Path("examples/tiny")
    assert Path(cfg.model) == tiny_dir / "model"
    assert Path(cfg.datasets[0].path) == tiny_dir / "data" / "train.jsonl"
    assert cfg.datasets[0].type == "conversation" and cfg.lora is False
    # the generator's default output folder is examples/tiny, i.e. exactly those paths
    assert Path(mod.__file__).resolve().parent == ROOT / tiny_dir
    gitignore = (ROOT / tiny_dir / ".gitignore").read_text().split()
    assert {"model/", "data/"} <= set(gitignore)
