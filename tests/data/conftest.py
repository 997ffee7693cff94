"""Fixtures for the data-pipeline tests: a byte-level BPE tokenizer trained on the fly, model folders
with and without a chat template, tiny data files and configs built through the real schema."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from surogate.schema import config_from_dict

SPECIAL = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "hello world how are you today", "the quick brown fox jumps over the lazy dog",
    "you are a helpful assistant", "what is the capital of france paris is the capital",
    "tell me a joke about cats and dogs", "system user assistant tool call weather",
    "translate this sentence into french please", "one two three four five six seven eight nine ten",
] * 4

# ChatML with {% generation %} markers (the assistant turn including <|im_end|> is trained on).
CHATML_GEN = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{{ '\n' }}{% else %}{{ message['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# The same layout without markers: the pipeline must find assistant spans by prefix diffing.
CHATML_PLAIN = CHATML_GEN.replace("{% generation %}", "").replace("{% endgeneration %}", "")


def build_tokenizer(chat_template: str | None = None) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


@pytest.fixture(scope="session")
def tokenizer_factory():
    cache: dict = {}

    def make(chat_template: str | None = CHATML_GEN) -> PreTrainedTokenizerFast:
        if chat_template not in cache:
            cache[chat_template] = build_tokenizer(chat_template)
        return cache[chat_template]

    return make


@pytest.fixture
def model_dir(tmp_path, tokenizer_factory):
    """Factory: save a tokenizer (with the given chat template) as a model folder and return its path."""

    def make(chat_template: str | None = CHATML_GEN, name: str = "model") -> str:
        path = tmp_path / name
        tokenizer_factory(chat_template).save_pretrained(path)
        return str(path)

    return make


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def conv(*turns: str, roles=("user", "assistant")) -> dict:
    """A conversation row alternating `roles`."""
    return {"messages": [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]}


def make_cfg(tmp_path: Path, model: str, datasets: list[dict], **options):
    data = {"model": model, "datasets": datasets, "output_dir": str(tmp_path / "out"),
            "validation_split_ratio": 0.0, "dataloader_num_workers": 0, "sequence_len": 64}
    data.update(options)
    return config_from_dict(data)
