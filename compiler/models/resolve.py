"""`resolve_model(cfg)`: turn `model:` (+ `model_type`, `torch_dtype`, `max_model_len`, `rope_scaling`)
into a `ModelSpec`. Order: local directory -> local Hugging Face cache (offline) -> built-in preset."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from surogate.compiler.models.presets import find_preset, preset_ids
from surogate.compiler.models.rope import apply_rope_overrides
from surogate.compiler.models.spec import TORCH_DTYPES, ModelSpec
from surogate.errors import UserError

# HF `model_type` -> our builder family.
FAMILIES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "qwen3_moe": "qwen3_moe"}
# `model_type:` option values -> the families they may name (`qwen` = any Qwen family).
MODEL_TYPE_GROUPS = {
    "llama": ("llama",),
    "qwen": ("qwen2", "qwen3", "qwen3_moe"),
    "qwen2": ("qwen2",),
    "qwen3": ("qwen3",),
    "qwen3_moe": ("qwen3_moe",),
}
_ARCH_FAMILIES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
                  "Qwen3MoeForCausalLM": "qwen3_moe"}
_REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")


def resolve_model(cfg: Any) -> ModelSpec:
    """Find the model's config.json (directory, HF cache, or preset) and apply the config's overrides."""
    model = getattr(cfg, "model", None)
    if not model or not isinstance(model, str):
        raise UserError("model: required (a local model directory or a Hugging Face id such as Qwen/Qwen3-0.6B)")
    hf_config, source_dir, preset = _load_config(model)
    family = _detect_family(hf_config, getattr(cfg, "model_type", None), model)
    missing = [k for k in _REQUIRED if k not in hf_config]
    if missing:
        raise UserError(f"model: config.json of {model!r} lacks {', '.join(missing)}")
    check_architecture(hf_config, model)
    quant = hf_config.get("quantization_config")
    if quant:  # its weights are packed codes + scales under other names: fail here, not at the first tensor
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else "?"
        raise UserError(f"model: {model!r} is a pre-quantized checkpoint (quantization_config, quant_method "
                        f"{method!r}), which this version does not load; point `model` at the unquantized "
                        "model and quantize it at load time with qlora_bnb / qlora_fp8 / qlora_fp4")
    dtype = _resolve_dtype(getattr(cfg, "torch_dtype", None), hf_config)
    hf_config, max_len, rope = apply_rope_overrides(
        hf_config, getattr(cfg, "max_model_len", None), getattr(cfg, "rope_scaling", None)
    )
    seq = getattr(cfg, "sequence_len", None)
    if seq is not None and seq > max_len:
        raise UserError(
            f"sequence_len: {seq} exceeds the model's maximum length {max_len}; "
            "lower sequence_len or raise max_model_len (with rope_scaling)"
        )
    return ModelSpec(name=model, family=family, hf_config=hf_config, source_dir=source_dir, dtype=dtype,
                     max_model_len=max_len, rope=rope, preset=preset)


_POSITIVE_INTS = (*_REQUIRED, "num_key_value_heads", "head_dim")


def check_architecture(hf_config: dict[str, Any], model: str) -> None:
    """The architecture fields the graph is built from: whole positive numbers that fit together (else a
    UserError naming the field, not a failure deep in the graph builder)."""
    where = f"model: config.json of {model!r}"
    for key in _POSITIVE_INTS:
        value = hf_config.get(key)
        if value is None and key not in _REQUIRED:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise UserError(f"{where}: {key} must be a positive integer, got {value!r}")
    heads, kv = hf_config["num_attention_heads"], hf_config.get("num_key_value_heads") or hf_config["num_attention_heads"]
    if heads % kv:
        raise UserError(f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
    if hf_config.get("head_dim") is None and hf_config["hidden_size"] % heads:
        raise UserError(f"{where}: hidden_size {hf_config['hidden_size']} is not a multiple of num_attention_heads "
                        f"{heads} (and head_dim is not given)")
    for key in ("rms_norm_eps", "rope_theta"):
        value = hf_config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float) or value <= 0):
            raise UserError(f"{where}: {key} must be a positive number, got {value!r}")


def _load_config(model: str) -> tuple[dict[str, Any], Path | None, str | None]:
    path = Path(model).expanduser()
    if path.is_dir():
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise UserError(f"model: directory {model!r} has no config.json")
        return _read_json(cfg_file, "model"), path.resolve(), None
    if path.is_file() and path.name == "config.json":
        return _read_json(path, "model"), path.parent.resolve(), None
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise UserError(f"model: directory {model!r} does not exist")
    cached = _from_hf_cache(model)
    if cached is not None:
        return _read_json(cached, "model"), cached.parent, None
    preset = find_preset(model)
    if preset is not None:
        return preset[1], None, preset[0]
    raise UserError(
        f"model: {model!r} is not a local directory, is not in the local Hugging Face cache, and is not a "
        f"built-in preset. Download it first (`huggingface-cli download {model}`) or point `model:` at a "
        f"directory holding config.json and safetensors weights. Built-in presets: {', '.join(preset_ids())}"
    )


def _from_hf_cache(model_id: str) -> Path | None:
    """config.json of `model_id` in the local HF cache (no network), or None."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub ships with transformers
        return None
    try:
        found = try_to_load_from_cache(model_id, "config.json")
    except Exception:  # noqa: BLE001 - malformed ids: not cached
        return None
    return Path(found) if isinstance(found, str) else None


def _read_json(path: Path, field: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{field}: cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"{field}: {path} is not a JSON object")
    return data


def detect_family(hf_config: dict[str, Any]) -> str | None:
    """Our family for a config.json, from `model_type`, then `architectures`."""
    fam = FAMILIES.get(str(hf_config.get("model_type", "")))
    if fam:
        return fam
    for arch in hf_config.get("architectures") or []:
        if arch in _ARCH_FAMILIES:
            return _ARCH_FAMILIES[arch]
    return None


def _detect_family(hf_config: dict[str, Any], override: str | None, model: str) -> str:
    detected = detect_family(hf_config)
    if override is None:
        if detected is None:
            raise UserError(
                f"model: {model!r} has model_type {hf_config.get('model_type')!r}, which Surogate does not "
                f"support (supported: {', '.join(sorted(FAMILIES))}); set model_type: to one of "
                f"{', '.join(MODEL_TYPE_GROUPS)} if the architecture is the same"
            )
        return detected
    group = MODEL_TYPE_GROUPS.get(override)
    if group is None:
        raise UserError(f"model_type: unknown value {override!r} (expected one of {', '.join(MODEL_TYPE_GROUPS)})")
    if detected in group:
        return detected
    if detected is not None:
        raise UserError(
            f"model_type: {override!r} does not match the model's config ({model!r} is "
            f"{hf_config.get('model_type')!r}); remove model_type to auto-detect"
        )
    if len(group) > 1:
        raise UserError(f"model_type: {override!r} is ambiguous for {model!r}; name the exact family ({', '.join(group)})")
    return group[0]


def _resolve_dtype(option: str | None, hf_config: dict[str, Any]) -> str:
    if option is not None:
        if option not in TORCH_DTYPES:
            raise UserError(f"torch_dtype: unknown dtype {option!r} (expected bfloat16, float16 or float32)")
        return TORCH_DTYPES[option]
    raw = hf_config.get("torch_dtype") or hf_config.get("dtype") or "bfloat16"
    return TORCH_DTYPES.get(str(raw).replace("torch.", ""), "bf16")
