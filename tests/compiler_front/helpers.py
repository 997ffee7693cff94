"""Shared helpers: tiny random HF models saved to disk, configs, our front-half pipeline, HF oracle runs."""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

import torch

from surogate.compiler.ir import Graph
from surogate.compiler.models import build_forward_graph, resolve_model
from surogate.compiler.passes.autodiff import emit_backward
from surogate.compiler.passes.chunking import apply_chunking
from surogate.compiler.passes.fusion import fuse_lora_merge
from surogate.compiler.passes.lora import inject_lora
from surogate.compiler.passes.precision import annotate_precision
from surogate.compiler.passes.recompute import apply_recompute
from surogate.runtime.batches import shift_labels  # noqa: F401 - re-exported for the tests
from surogate.runtime.reference import batch_inputs, gradients, load_weights, run_graph

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=101, max_position_embeddings=256, rms_norm_eps=1e-6)


def hf_config(family: str, tie: bool = False, **over: Any):
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config, Qwen3MoeConfig

    kw = {**TINY, "tie_word_embeddings": tie, **over}
    if family == "llama":
        return LlamaConfig(**kw, head_dim=16)
    if family == "qwen2":
        return Qwen2Config(**kw)
    if family == "qwen3":
        return Qwen3Config(**kw, head_dim=16)
    if family == "qwen3_moe":
        return Qwen3MoeConfig(**kw, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                              norm_topk_prob=True)
    raise ValueError(family)


def save_tiny(tmp: Path, family: str, tie: bool = False, seed: int = 0, **over: Any) -> Path:
    """Random fp32 model of `family` saved with save_pretrained (safetensors) under `tmp`; returns the dir."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(family, tie, **over), dtype=torch.float32)
    with torch.no_grad():  # non-trivial norm weights so their gradients are checked meaningfully
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    out = tmp / f"{family}{'-tied' if tie else ''}"
    model.save_pretrained(out, safe_serialization=True)
    return out


def make_cfg(model: str | Path, **over: Any) -> types.SimpleNamespace:
    base = dict(model=str(model), model_type=None, sequence_len=16, per_device_train_batch_size=2, lora=False,
                lora_rank=4, lora_alpha=8, lora_dropout=0.0, lora_dtype="fp32", lora_target_modules=("all",),
                train_router=False, from_scratch=False, recompute=False, lmhead_chunks=1, attn_bwd_chunks=1,
                torch_dtype=None, max_model_len=None, rope_scaling=None, recipe="bf16", gradient_dtype=None,
                master_dtype=None, qlora_fp4=False, qlora_fp8=False, qlora_bnb=False, qlora_block_size=128,
                qlora_bnb_block_size=64, qlora_bnb_double_quant=True, skip_quant_first_layers=0,
                skip_quant_last_layers=0, fp8_amax_history=16, gpus=1, router_aux_loss_coef=None,
                router_z_loss_coef=None, init_projections_to_zero=False)
    base.update(over)
    return types.SimpleNamespace(**base)


def compile_front(cfg: Any, *, backward: bool = True) -> Graph:
    """resolve -> build -> lora -> precision -> autodiff -> recompute -> fuse_lora_merge -> chunking (the front-half
    order)."""
    graph = build_forward_graph(resolve_model(cfg), cfg)
    graph = annotate_precision(inject_lora(graph, cfg), cfg)
    if not backward:
        return graph
    return apply_chunking(fuse_lora_merge(apply_recompute(emit_backward(graph, cfg), cfg), cfg), cfg)


def random_batch(vocab: int, b: int, t: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and HF-style (unshifted) labels with a few ignored positions."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, t), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100
    return ids, labels


def run_ours(graph: Graph, model_dir: Path, ids: torch.Tensor, labels_hf: torch.Tensor,
             weights: dict[str, torch.Tensor] | None = None, **inputs: Any) -> tuple[float, dict[str, torch.Tensor]]:
    values = dict(weights) if weights is not None else load_weights(graph, model_dir)
    values.update(batch_inputs(graph, ids, shift_labels(labels_hf), **inputs))
    run_graph(graph, values)
    return float(values["loss"]), gradients(graph, values)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def qwen3_graph_before_fusion(**over: Any) -> tuple[Graph, types.SimpleNamespace]:
    """Qwen3-0.6B (LoRA r8, recompute, 8 tokens unless `over` says otherwise) through the passes up to
    `recompute`: the graph the fusion passes rewrite, and its config."""
    cfg = make_cfg("Qwen/Qwen3-0.6B", **{**dict(lora=True, lora_rank=8, lora_alpha=16, sequence_len=8,
                                                 recompute=True), **over})
    graph = annotate_precision(inject_lora(build_forward_graph(resolve_model(cfg), cfg), cfg), cfg)
    return apply_recompute(emit_backward(graph, cfg), cfg), cfg
