"""Shared pieces of the multi-rank tests: a tiny model and text data, configs for N ranks, reading results."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from surogate.runtime.observe.jsonl import read_log
from tests.runtime.helpers import save_model, text_cfg, write_text_data

STEPS = 3


# Shapes chosen so that every ZeRO shard of every tensor (weights, LoRA A/B with rank 16, norms) holds a
# multiple of 256 elements: the 8-bit AdamW moments are quantized per block of 256 elements of the rank's
# shard, so only then are the blocks those of the single-process run and the comparison exact to fp32
# rounding (otherwise the per-block absmax differs, as with any ZeRO-sharded blockwise 8-bit optimizer).
MODEL = dict(hidden_size=512, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
             num_key_value_heads=4)
LORA_RANK = 16


def make_root(root: Path) -> Path:
    """The tiny llama model (head_dim 8) and 48 short text rows (with a validation split the runs evaluate)."""
    save_model(root / "model", "llama", **MODEL)
    write_text_data(root / "train.jsonl", rows=48)
    return root


def cfg_for(root: Path, name: str, *, gpus: int, accumulation: int, lora: bool = True, **over: Any):
    """The same training for any rank count: global batch = 2 rows x accumulation x gpus."""
    base = dict(gpus=gpus, gradient_accumulation_steps=accumulation, lora=lora, lora_rank=LORA_RANK, lora_alpha=32,
                max_steps=STEPS, max_grad_norm=1.0, validation_split_ratio=0.2, eval_steps=2)
    base.update(over)
    return text_cfg(root / "model", root / "train.jsonl", root / name, **base)


def log_steps(out: Path) -> dict[int, dict]:
    return {int(r["step"]): r for r in read_log(out / "log.jsonl").steps}


def exported(out: Path, lora: bool) -> dict[str, torch.Tensor]:
    folder = out / ("adapter" if lora else "model")
    files = sorted(folder.glob("*.safetensors"))
    assert files, f"no safetensors in {folder}"
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors |= load_file(str(f))
    return tensors


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))

