"""Create the offline tiny example: a small Qwen3-architecture model, its tokenizer, and a learnable dataset.

    python examples/tiny/make_tiny.py examples/tiny      # -> examples/tiny/model/, examples/tiny/data/train.jsonl

Nothing is downloaded and it takes seconds. The model is randomly initialised (hidden 64, 2 layers,
4 heads, vocabulary 768: the byte-level alphabet plus one token per word and number), saved with
`save_pretrained` as safetensors; the tokenizer is a byte-level BPE trained on the generated data,
saved as a `PreTrainedTokenizerFast` with a ChatML chat template (assistant turns marked with
`{% generation %}` so the loss covers only the answers). The data are conversations with two small
tasks a tiny model learns within a few hundred CPU steps: reverse four words, add two numbers below 50.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

VOCAB_SIZE = 768
WORDS = (
    "apple river stone cloud green quiet tiger window paper seven orange music candle silver forest bread "
    "yellow garden lamp ocean pencil rabbit winter summer coffee mirror planet rocket shadow thunder violet "
    "whale zebra anchor basket castle dragon feather guitar honey island jacket kettle lemon marble needle "
    "pepper rainbow saddle tomato"
).split()
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# ChatML as Qwen writes it; `generation` marks what the loss is computed on.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message.role == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{% generation %}{{- message.content + '<|im_end|>' -}}{% endgeneration %}"
    "{{- '\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def make_conversations(n: int, seed: int = 0) -> list[dict]:
    """`n` conversations, half "reverse these words", half "add these numbers", deterministic in `seed`."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        if i % 2 == 0:
            words = rng.sample(WORDS, 4)
            question, answer = "reverse: " + " ".join(words), " ".join(reversed(words))
        else:
            a, b = rng.randrange(50), rng.randrange(50)
            question, answer = f"add: {a} + {b}", str(a + b)
        rows.append({"messages": [{"role": "user", "content": question},
                                  {"role": "assistant", "content": answer}]})
    return rows


def build_tokenizer(rows: list[dict]):
    """Byte-level BPE (like Qwen's) trained on the rendered conversations, wrapped for `transformers`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    # Train on the text as the template renders it (role names, newlines), and on every word and number
    # both after a space and at the start of a line, so each becomes one token in either position.
    texts = [f"{m['role']}\n{m['content']}" for r in rows for m in r["messages"]]
    texts += [f"{w}\n {w}" for w in WORDS for _ in range(50)] + [f"{n}\n {n}" for n in range(100) for _ in range(50)]
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   model_max_length=512)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(tokenizer, seed: int = 0):
    """A randomly initialised Qwen3-architecture causal LM sized for CPU training."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    config = Qwen3Config(
        vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
        rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def make_tiny(out_dir: str | Path, rows: int = 4000, seed: int = 0) -> dict[str, Path]:
    """Write `model/` (weights, config, tokenizer) and `data/train.jsonl` under `out_dir`; returns the paths."""
    out = Path(out_dir)
    model_dir, data_dir = out / "model", out / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    conversations = make_conversations(rows, seed)
    data_file = data_dir / "train.jsonl"
    with open(data_file, "w", encoding="utf-8") as f:
        for row in conversations:
            f.write(json.dumps(row) + "\n")
    tokenizer = build_tokenizer(conversations)
    model = build_model(tokenizer, seed)
    model.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    return {"model": model_dir, "data": data_file}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", default=str(Path(__file__).resolve().parent),
                        help="folder to create model/ and data/ in (default: this script's folder)")
    parser.add_argument("--rows", type=int, default=4000, help="number of conversations (default 4000)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    paths = make_tiny(args.out_dir, args.rows, args.seed)
    print(f"model: {paths['model']}\ndata:  {paths['data']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
