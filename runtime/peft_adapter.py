"""Reading a PEFT LoRA adapter folder for `adapter_path`: its adapter_config.json and tensors checked, as the merge
into the base weights (runtime/reference/weights.py) needs them; anything malformed, or that a merge cannot honour
the way PEFT's `merge_and_unload` would, is a UserError naming the file and the key or tensor."""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from surogate.errors import UserError
from surogate.runtime.export import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_PREFIX, lora_modules

# adapter_config.json options merging cannot honour (a merge would silently differ from PEFT's model).
_UNMERGEABLE = {
    "use_dora": "DoRA (use_dora)", "alpha_pattern": "per-module lora_alpha (alpha_pattern)",
    "fan_in_fan_out": "fan_in_fan_out", "lora_bias": "LoRA biases (lora_bias)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)", "layer_replication": "layer_replication",
    "target_parameters": "LoRA on parameters (target_parameters)", "use_qalora": "QALoRA (use_qalora)",
}
_BIAS_MODES = ("none", "all", "lora_only")


@dataclass
class PeftAdapter:
    """A PEFT LoRA adapter folder read for merging (`adapter_path`).

    `lora`: `<module>.lora_A.weight` / `.lora_B.weight` by plain module name (PEFT's `base_model.model.` prefix
    and adapter name removed); `replaced`: whole tensors by HF name that take the place of the base model's
    (`modules_to_save`, and biases trained with `bias: all / lora_only`), as PEFT's `merge_and_unload` leaves them.
    """

    folder: Path
    config: dict[str, Any]
    lora: dict[str, torch.Tensor]
    replaced: dict[str, torch.Tensor]
    lora_alpha: float
    use_rslora: bool

    def scale(self, rank: int) -> float:
        """The LoRA scale of a module of this rank: lora_alpha / r (/ sqrt(r) with rsLoRA)."""
        return self.lora_alpha / (math.sqrt(rank) if self.use_rslora else rank)

    def deltas(self) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
        """Base weight name -> (A, B, scale): the update `scale * B @ A` merging adds to it (each module's rank
        is its A's: `rank_pattern` may give modules other ranks than `r`)."""
        return {f"{m}.weight": (a, b, self.scale(a.shape[0])) for m, (a, b) in lora_modules(self.lora).items()}


def _config_error(path: Path, key: str, expected: str, value: Any) -> UserError:
    return UserError(f"adapter_path: {path}: {key} must be {expected}, got {value!r}")


def _check_adapter_config(path: Path, config: Any) -> tuple[float, bool]:
    """Types of the adapter_config.json keys merging reads; (lora_alpha, use_rslora)."""
    if not isinstance(config, dict):
        raise UserError(f"adapter_path: {path} is not a JSON object")
    if config.get("peft_type") != "LORA":
        raise UserError(f"adapter_path: {path} has peft_type {config.get('peft_type')!r}; only LORA can be merged")
    for key in ("r", "lora_alpha"):
        if key not in config:
            raise UserError(f"adapter_path: {path} lacks {key} (the LoRA scale is lora_alpha / r)")
    r, alpha = config["r"], config["lora_alpha"]
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise _config_error(path, "r", "a positive integer", r)
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha) or alpha <= 0:
        raise _config_error(path, "lora_alpha", "a positive number", alpha)
    targets = config.get("target_modules")
    if targets is not None and not isinstance(targets, str) and (
            not isinstance(targets, list) or not all(isinstance(t, str) for t in targets)):
        raise _config_error(path, "target_modules", "a list of module names (or a regular expression string)", targets)
    saved = config.get("modules_to_save")
    if saved is not None and (not isinstance(saved, list) or not all(isinstance(t, str) for t in saved)):
        raise _config_error(path, "modules_to_save", "a list of module names or null", saved)
    for key in ("use_rslora", "use_dora", "fan_in_fan_out", "lora_bias"):
        if config.get(key) is not None and not isinstance(config[key], bool):
            raise _config_error(path, key, "true or false", config[key])
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key) is not None and not isinstance(config[key], dict):
            raise _config_error(path, key, "an object", config[key])
    if config.get("bias", "none") not in _BIAS_MODES:
        raise _config_error(path, "bias", f"one of {', '.join(_BIAS_MODES)}", config.get("bias"))
    unsupported = [what for key, what in _UNMERGEABLE.items() if config.get(key)]
    if unsupported:
        raise UserError(f"adapter_path: {path} uses {', '.join(unsupported)}, which merging does not support; merge "
                        "it with PEFT (`merge_and_unload`) and point `model:` at the result")
    return float(alpha), bool(config.get("use_rslora"))


def _saved_module(module: str, modules_to_save: list[str]) -> bool:
    """Whether PEFT's `modules_to_save` covers `module` (a full name or a `.`-suffix of it)."""
    return any(module == m or module.endswith(f".{m}") for m in modules_to_save)


def load_peft_adapter(adapter_dir: str | os.PathLike) -> PeftAdapter:
    """Read and check a PEFT LoRA adapter folder (for `adapter_path`); anything malformed or that merging cannot
    honour is a UserError naming the file and the key or tensor."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(adapter_dir)
    cfg_path, weights = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    for f in (cfg_path, weights):
        if not f.is_file():
            raise UserError(f"adapter_path: {f} not found (a PEFT adapter folder has {ADAPTER_CONFIG} and "
                            f"{ADAPTER_WEIGHTS})")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:
        raise UserError(f"adapter_path: {cfg_path} is not valid JSON ({exc})") from None
    alpha, rslora = _check_adapter_config(cfg_path, config)
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise UserError(f"adapter_path: cannot read {weights}: {str(exc).splitlines()[0]} (truncated or not a "
                        "safetensors file?)") from None
    if not state:
        raise UserError(f"adapter_path: {weights} holds no tensors: there is nothing to merge")
    saved = config.get("modules_to_save") or []
    bias = config.get("bias", "none")
    lora, replaced = {}, {}
    for key, t in state.items():
        plain = key.removeprefix(PEFT_PREFIX)
        for which in ("lora_A", "lora_B"):  # some writers keep the adapter name: lora_A.default.weight
            plain = re.sub(rf"\.{which}\.[^.]+\.weight$", f".{which}.weight", plain)
        if not t.is_floating_point():
            raise UserError(f"adapter_path: {weights}: tensor {key!r} has dtype {t.dtype}, not a floating-point type")
        if plain.endswith((".lora_A.weight", ".lora_B.weight")):
            lora[plain] = t
            continue
        if ".lora_" in plain or "token_adapter" in plain or "trainable_tokens" in plain:
            raise UserError(f"adapter_path: {weights} holds {key!r}, which merging does not support (LoRA A/B "
                            "weights, modules_to_save and trained biases are merged)")
        name = plain.replace(".base_layer.", ".")
        module = name.rsplit(".", 1)[0]
        if not (_saved_module(module, saved) or (bias != "none" and name.endswith(".bias"))):
            raise UserError(f"adapter_path: {weights} holds {key!r}, which is neither a LoRA A/B tensor nor a module "
                            f"of modules_to_save ({saved}) in {cfg_path}")
        replaced[name] = t
    try:
        modules = lora_modules(lora)
    except ValueError as exc:
        raise UserError(f"adapter_path: {weights}: {exc}") from None
    if not config.get("rank_pattern"):
        wrong = [(m, a.shape[0]) for m, (a, _) in modules.items() if a.shape[0] != config["r"]]
        if wrong:
            raise UserError(f"adapter_path: {weights}: LoRA module {wrong[0][0]!r} has rank {wrong[0][1]}, but "
                            f"{cfg_path} says r {config['r']} (and no rank_pattern)")
    return PeftAdapter(folder, config, lora, replaced, alpha, rslora)
