"""Initial values of a plan's persistent tensors: pretrained or random weights, masters, optimizer states.

- Pretrained: safetensors of the model folder by each tensor's `source` (HF name); LoRA A/B by PEFT's
  init (A kaiming-uniform, B zero), seeded by `train_seed`.
- `from_scratch`: the model's own Hugging Face initialisation (`from_config`); weights the builder marks
  `init: zeros` (biases, and o_proj/down_proj with `init_projections_to_zero`) start at zero.
- `adapter_path`: a PEFT adapter merged into the base weights before training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from surogate.compiler.ir import Role
from surogate.compiler.plan import Plan
from surogate.errors import UserError
from surogate.runtime.executor import ArenaExecutor
from surogate.runtime.optim import init_optimizer_state


def _from_scratch(plan: Plan, hf_config: dict[str, Any], cfg: Any) -> dict[str, torch.Tensor]:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(int(cfg.train_seed))
    config = AutoConfig.for_model(**hf_config)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    by_source = dict(model.state_dict())
    if getattr(config, "tie_word_embeddings", False):
        by_source.setdefault("lm_head.weight", by_source["model.embed_tokens.weight"])
    out: dict[str, torch.Tensor] = {}
    for name, t in plan.tensors.items():
        if t.role not in (Role.TRAINABLE_WEIGHT, Role.FROZEN_WEIGHT) or t.source is None:
            continue
        if t.source not in by_source:
            raise UserError(f"from_scratch: the model class has no weight {t.source!r}")
        value = by_source[t.source]
        # The builder marks what starts at zero (biases; o_proj/down_proj with init_projections_to_zero).
        out[name] = torch.zeros_like(value) if t.attrs.get("init") == "zeros" else value
    return out


def initial_weights(plan: Plan, cfg: Any, model_dir: Path | None, hf_config: dict[str, Any],
                    notes: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Plan tensor name -> initial value for every weight the plan loads (`notes`: what the user should know
    about the checkpoint, e.g. tensors it holds that the model does not use)."""
    from surogate.runtime.reference import load_weights

    if cfg.from_scratch:
        return _from_scratch(plan, hf_config, cfg)
    if model_dir is None:
        raise UserError(f"model: {cfg.model!r} resolved to a built-in architecture preset without weights; training "
                        "needs the weights: download the model and point `model:` at its folder (or set "
                        "`from_scratch: true` to train from random initialisation)")
    # The adapter is merged into the checkpoint's weights before any QLoRA quantization.
    return load_weights(plan, model_dir, lora_seed=int(cfg.train_seed), adapter_path=cfg.adapter_path, notes=notes)


def unquantized_base_weights(plan: Plan, model_dir: Path | None, adapter_path: str | None) -> dict[str, torch.Tensor]:
    """HF name -> original-precision weight for every QLoRA-quantized tensor of the plan (read again from
    the checkpoint, with `adapter_path` merged as at load): a merged QLoRA model is merged into the real
    weights, not into their 4-bit approximation."""
    from surogate.runtime.reference.weights import checkpoint_reader

    sources = {t.source for t in plan.tensors.values() if t.role is Role.QUANT_WEIGHT and t.source}
    if not sources:
        return {}
    if model_dir is None:
        raise UserError("merge_adapter: merging a QLoRA adapter needs the model's original weights; "
                        f"{plan.meta.get('model_path') or 'the model'} has none on disk")
    reader = checkpoint_reader(model_dir, adapter_path)
    return {src: reader.get(src) for src in sorted(sources)}


def initialise(executor: ArenaExecutor, weights: dict[str, torch.Tensor]) -> None:
    """Write weights into the arena; derive master copies; zero the optimizer states."""
    plan = executor.plan
    for name, value in weights.items():
        if name in executor.views:
            executor.write(name, value)
    for name, view in executor.views.items():
        t = plan.tensors[name]
        if t.role is Role.MASTER_WEIGHT:
            view.copy_(weights[t.attrs["master_of"]].to(view.dtype))
        elif t.role is Role.OPTIMIZER_STATE:
            init_optimizer_state(name, view, t.attrs.get("state", ""))
