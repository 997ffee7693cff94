"""Tiny random Hugging Face models and tokenizers, built on the fly (nothing downloaded)."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast, Qwen3Config

VOCAB = 96


def tiny_config(family: str, tied: bool):
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=tied,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return Qwen3Config(**common) if family == "qwen3" else LlamaConfig(**common)


def tiny_model(family: str, tied: bool, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, tied), dtype=torch.float32)
    return model.eval()


def save_tiny_tokenizer(out: Path) -> None:
    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(VOCAB - 4)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.save_pretrained(out)


def save_tiny_source(model, out: Path) -> Path:
    """A source model folder as a user would have it: weights, config, tokenizer."""
    model.save_pretrained(out)
    save_tiny_tokenizer(out)
    return out


def batch(seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (2, 7), generator=g)
