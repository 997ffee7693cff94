"""Initial values of a plan's persistent tensors: pretrained or random weights, masters, optimizer states.

- Pretrained: safetensors of the model folder by each tensor's `source` (HF name); LoRA A/B by PEFT's
  init (A kaiming-uniform, B zero), seeded by `train_seed`.
- `from_scratch`: the model's own Hugging Face initialisation (`from_config`), then
  `init_projections_to_zero` zeroes the attention output and MLP down projections.
- `adapter_path`: a PEFT adapter merged into the base weights before training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from surogate.compiler.ir import Role
from surogate.compiler.plan import Plan
from surogate.errors import NotAvailableError, UserError
from surogate.runtime.executor import ArenaExecutor
from surogate.runtime.optim import init_optimizer_state

ZERO_INIT_MODULES = ("o_proj", "down_proj")


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
        if cfg.init_projections_to_zero and any(f".{m}." in t.source for m in ZERO_INIT_MODULES):
            value = torch.zeros_like(value)
        out[name] = value
    return out


def _merge_adapter(weights: dict[str, torch.Tensor], plan: Plan, adapter_path: str) -> None:
    """Fold a PEFT adapter (`adapter_config.json` + `adapter_model.safetensors`) into the base weights."""
    import json

    from safetensors.torch import load_file

    from surogate.runtime.export import PEFT_PREFIX, merge_lora

    folder = Path(adapter_path)
    config_file, weights_file = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    for f in (config_file, weights_file):
        if not f.is_file():
            raise UserError(f"adapter_path: {f} not found (expected a PEFT adapter folder)")
    try:
        adapter_cfg = json.loads(config_file.read_text())
        raw = load_file(str(weights_file))
    except Exception as exc:  # malformed JSON or safetensors
        raise UserError(f"adapter_path: cannot read the adapter in {folder}: {exc}") from None
    for key, what in (("use_dora", "DoRA"), ("alpha_pattern", "per-module lora_alpha (alpha_pattern)")):
        if adapter_cfg.get(key):
            raise UserError(f"adapter_path: the adapter in {folder} uses {what}, which cannot be merged; "
                            "merge it with PEFT (`merge_and_unload`) and point `model:` at the result")
    lora = {k.removeprefix(PEFT_PREFIX): v for k, v in raw.items()}
    by_source = {t.source: n for n, t in plan.tensors.items() if n in weights and t.source}
    base = {src: weights[name] for src, name in by_source.items()}
    try:
        # rsLoRA scales by alpha / sqrt(r); per-module ranks (rank_pattern) come from the tensors' shapes
        merged = merge_lora(base, lora, lora_alpha=float(adapter_cfg["lora_alpha"]),
                            use_rslora=bool(adapter_cfg.get("use_rslora", False)))
    except (KeyError, ValueError) as exc:
        raise UserError(f"adapter_path: adapter in {folder} does not fit the model: {exc}") from None
    for src, value in merged.items():
        weights[by_source[src]] = value


def initial_weights(plan: Plan, cfg: Any, model_dir: Path | None, hf_config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Plan tensor name -> initial value for every weight the plan loads."""
    from surogate.runtime.reference import load_weights

    if any(t.role is Role.QUANT_WEIGHT for t in plan.tensors.values()):
        raise NotAvailableError("QLoRA (quantized base weights) cannot train on the cpu backend yet; plan it with "
                                "`surogate plan`, or train with lora and no qlora_* option")
    if cfg.from_scratch:
        return _from_scratch(plan, hf_config, cfg)
    if model_dir is None:
        raise UserError(f"model: {cfg.model!r} resolved to a built-in architecture preset without weights; training "
                        "needs the weights: download the model and point `model:` at its folder (or set "
                        "`from_scratch: true` to train from random initialisation)")
    weights = load_weights(plan, model_dir, lora_seed=int(cfg.train_seed))
    if cfg.adapter_path:
        _merge_adapter(weights, plan, cfg.adapter_path)
    return weights


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
