"""Tokenize + pack N synthetic conversations; print rows/s and tokens/s per worker count, and packing efficiency.

    .venv/bin/python benchmarks/tokenize_throughput.py [--rows 100000] [--workers 1,2] [--seq-len 2048]

Everything is built locally (a byte-level BPE tokenizer trained on the synthetic vocabulary, a ChatML
template with generation markers); nothing is downloaded. The cache is bypassed so every run tokenizes.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from surogate.runtime.data import prepare_datasets
from surogate.runtime.data.packing import pack_best_fit_decreasing, packing_efficiency
from surogate.runtime.data.sources import load_source, resolve_source
from surogate.schema import config_from_dict

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{{ '\n' }}{% else %}{{ message['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
)


def synthetic_words(rng: random.Random, count: int = 800) -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    return ["".join(rng.choice(letters) for _ in range(rng.randint(2, 9))) for _ in range(count)]


def write_conversations(path: Path, rows: int, rng: random.Random, words: list[str]) -> None:
    def sentence(lo: int, hi: int) -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi)))

    with path.open("w") as f:
        for _ in range(rows):
            messages = [{"role": "system", "content": sentence(3, 12)}] if rng.random() < 0.3 else []
            for _ in range(rng.randint(1, 3)):
                messages += [{"role": "user", "content": sentence(5, 60)},
                             {"role": "assistant", "content": sentence(10, 200)}]
            f.write(json.dumps({"messages": messages}) + "\n")


def build_tokenizer(folder: Path, words: list[str]) -> None:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=4000, special_tokens=["<pad>", "</s>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([" ".join(words)] * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>")
    fast.chat_template = CHATML
    fast.save_pretrained(folder)


def cpu_seconds() -> float:
    """CPU time of this process plus its finished children (the worker processes)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts (0 = in-process)")
    parser.add_argument("--seq-len", type=int, default=2048)
    args = parser.parse_args()
    rng = random.Random(0)
    words = synthetic_words(rng)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build_tokenizer(tmp / "model", words)
        write_conversations(tmp / "conv.jsonl", args.rows, rng, words)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tmp / "model")
        results = {}
        for workers in [int(w) for w in args.workers.split(",")]:
            cfg = config_from_dict({
                "model": str(tmp / "model"), "output_dir": str(tmp / "out"), "sequence_len": args.seq_len,
                "validation_split_ratio": 0.0, "dataloader_num_workers": workers,
                "datasets": [{"path": str(tmp / "conv.jsonl"), "type": "conversation"}]})
            load_source(resolve_source(cfg.datasets[0], 0))  # warm: JSON -> arrow conversion is not tokenizing
            cpu_before = cpu_seconds()
            start = time.perf_counter()
            data = prepare_datasets(cfg, tokenizer, use_cache=False, chunk_size=2000)
            seconds = time.perf_counter() - start
            cpu = cpu_seconds() - cpu_before
            stats = data.stats.train
            results[workers] = seconds
            print(f"workers={workers}: {stats.rows_in / seconds:,.0f} rows/s, {stats.tokens / seconds:,.0f} tokens/s "
                  f"({stats.rows_in:,} rows, {stats.tokens:,} tokens, {stats.trained_tokens:,} trained, "
                  f"{seconds:.1f}s); packed into {stats.packed_rows:,} rows of {args.seq_len}: "
                  f"efficiency {stats.efficiency:.2%}; CPU {cpu:.1f}s = {stats.rows_in / cpu:,.0f} rows per "
                  f"CPU-second (parent + workers; wall-clock figures depend on machine load)")
        lengths = data.train.doc_lengths()
        start = time.perf_counter()
        offsets, _ = pack_best_fit_decreasing(lengths, args.seq_len)
        pack_seconds = time.perf_counter() - start
        lower_bound = int(np.ceil(lengths.sum() / args.seq_len))
        print(f"best-fit-decreasing alone: {len(lengths):,} documents in {pack_seconds:.2f}s; "
              f"{len(offsets) - 1:,} rows vs lower bound {lower_bound:,} "
              f"(efficiency {packing_efficiency(int(lengths.sum()), len(offsets) - 1, args.seq_len):.2%})")
        if len(results) > 1:
            base = min(results)
            for workers, seconds in sorted(results.items()):
                print(f"speed-up workers={workers} vs workers={base}: {results[base] / seconds:.2f}x")


if __name__ == "__main__":
    main()
