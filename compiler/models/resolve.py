"""`resolve_model(cfg)`: turn `model:` (+ `model_type`, `torch_dtype`, `max_model_len`, `rope_scaling`)
into a `ModelSpec`. Order: local directory -> local Hugging Face cache (offline) -> built-in preset."""

from __future__ import annotations

import hashlib
import json
import struct
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
                     max_model_len=max_len, rope=rope, preset=preset,
                     weights_fingerprint=weights_fingerprint(source_dir) if source_dir is not None else None)


_POSITIVE_INTS = (*_REQUIRED, "num_key_value_heads", "head_dim")


MAX_DIM = 2**31 - 1
MAX_HEAD_DIM = 512  # numba_kernels/rope.py MAX_HALF: a token's cos/sin in shared memory
MAX_PARAMS = 2**48  # ~281T parameters: beyond any machine; the planner's byte offsets are int64


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
        if value > MAX_DIM:  # (tensor dims and token ids are int32 in the kernels; 1e20 overflowed the planner)
            raise UserError(f"{where}: {key} is {value}, larger than any model dimension Surogate supports "
                            f"({MAX_DIM})")
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
    head_dim = hf_config.get("head_dim") or hf_config["hidden_size"] // heads
    what = "head_dim" if hf_config.get("head_dim") else "the head size hidden_size / num_attention_heads"
    if head_dim > MAX_HEAD_DIM:  # (rope tables travel in the plan's attrs; the attention kernels take <= 256)
        raise UserError(f"{where}: {what} is {head_dim}, larger than Surogate supports ({MAX_HEAD_DIM})")
    if head_dim % 2:  # (transformers refuses it too, in a message the tokenizer loader used to cut off)
        raise UserError(f"{where}: {what} is {head_dim}, which must be even: rotary position embeddings rotate "
                        "pairs of values")
    layers = hf_config["num_hidden_layers"]
    hidden, inter = hf_config["hidden_size"], hf_config.get("intermediate_size") or 4 * hf_config["hidden_size"]
    experts = hf_config.get("num_experts")
    experts = experts if isinstance(experts, int) and not isinstance(experts, bool) and experts > 0 else 1
    per_layer = hidden * head_dim * (2 * heads + 2 * kv) + 3 * hidden * inter * experts
    params = layers * per_layer + 2 * hf_config["vocab_size"] * hidden
    if params > MAX_PARAMS:
        raise UserError(f"{where}: the architecture describes a model of about {params:.3g} parameters, beyond what "
                        f"Surogate plans ({MAX_PARAMS:.3g}); check the size fields")
    _check_semantics(hf_config, where)


# `hidden_act` values that are SiLU (transformers' ACT2FN), the only MLP activation the builders emit.
SUPPORTED_ACTS = ("silu", "swish")


def _check_semantics(hf_config: dict[str, Any], where: str) -> None:
    """Fields that change what the model computes: a value the builders do not implement is an error, never a
    model trained as something else."""
    act = hf_config.get("hidden_act", "silu")
    if act not in SUPPORTED_ACTS:
        raise UserError(f"{where}: hidden_act {act!r} is not supported (supported: {', '.join(SUPPORTED_ACTS)}); "
                        "the MLP would be trained with another activation than the model's")
    value = hf_config.get("max_position_embeddings")
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
        raise UserError(f"{where}: max_position_embeddings must be a positive integer, got {value!r}")
    for key in ("torch_dtype", "dtype"):
        value = hf_config.get(key)
        if value is not None and str(value).replace("torch.", "") not in TORCH_DTYPES:
            raise UserError(f"{where}: {key} {value!r} is not a floating-point dtype Surogate loads "
                            "(expected bfloat16, float16 or float32)")
    rope = hf_config.get("rope_parameters")
    rotary = hf_config.get("partial_rotary_factor", rope.get("partial_rotary_factor") if isinstance(rope, dict) else None)
    if rotary is not None and rotary != 1:
        raise UserError(f"{where}: partial_rotary_factor {rotary!r} is not supported (rotary embeddings over the "
                        "whole head only)")
    kinds = hf_config.get("layer_types")
    sliding = hf_config.get("use_sliding_window") is True or (
        isinstance(kinds, list) and any(k != "full_attention" for k in kinds))
    if sliding:
        raise UserError(f"{where}: sliding-window attention (use_sliding_window / layer_types) is not supported; "
                        "set use_sliding_window: false if the model was trained with full attention")


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
    return TORCH_DTYPES[str(raw).replace("torch.", "")]  # (check_architecture refused other values)


# ------------------------------------------------------------------------------ plan vs model folder
# config.json keys that do not change the model a plan was compiled for (written by whichever transformers
# saved the folder; the dtype is compared as the resolved `ModelSpec.dtype`).
_NOT_ARCHITECTURE = frozenset({"transformers_version", "_name_or_path", "torch_dtype", "dtype", "use_cache",
                               "architectures", "output_attentions", "output_hidden_states", "return_dict"})
_HEADER_LIMIT = 100 * 1024 * 1024  # safetensors' own bound on a header


def _safetensors_header(path: Path) -> dict[str, Any] | None:
    """A safetensors file's header (tensor name -> dtype, shape, offsets), read without its data; None if unreadable."""
    try:
        with open(path, "rb") as f:
            size = struct.unpack("<Q", f.read(8))[0]
            if size > _HEADER_LIMIT:
                return None
            header = json.loads(f.read(size))
    except (OSError, struct.error, ValueError):
        return None
    return header if isinstance(header, dict) else None


WEIGHTS_INDEX = "model.safetensors.index.json"
# what reading a malformed index raises: bad JSON, no weight_map, not a map
INDEX_ERRORS = (ValueError, KeyError, TypeError, AttributeError)


def indexed_weight_files(index: Path) -> list[str]:
    """The safetensors files a sharded checkpoint's index names (one of INDEX_ERRORS, or OSError, if malformed)."""
    return sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))


def weight_files(model_dir: Path) -> list[str] | None:
    """The safetensors files of a model folder (the index's, else every `*.safetensors`); None if the index is
    unreadable."""
    index = model_dir / WEIGHTS_INDEX
    if index.is_file():
        try:
            return indexed_weight_files(index)
        except (*INDEX_ERRORS, OSError):
            return None
    return sorted(p.name for p in model_dir.glob("*.safetensors"))


def weights_fingerprint(model_dir: Path) -> str | None:
    """SHA-256 over (name, dtype, shape) of every weight tensor of the folder, from the safetensors headers
    (cheap: no tensor data is read). None when the folder has no weights or one cannot be read (the loader
    then says what is wrong with it)."""
    files = weight_files(model_dir)
    if not files:
        return None
    rows = []
    for name in files:
        header = _safetensors_header(model_dir / name)
        if header is None:
            return None
        rows += [(k, v.get("dtype"), v.get("shape")) for k, v in header.items()
                 if k != "__metadata__" and isinstance(v, dict)]
    return hashlib.sha256(json.dumps(sorted(rows, key=lambda r: r[0])).encode()).hexdigest()


_ABSENT = object()


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True) if value is not _ABSENT else "absent"
    return text if len(text) <= 60 else text[:57] + "..."


def plan_model_changes(planned: dict[str, Any], spec: ModelSpec, *, weights: bool = True) -> list[str]:
    """What differs between the model a plan was compiled for (`planned`: its `meta["spec"]`) and `spec`, the
    model folder as it is now: config.json fields (`name old -> new`), the dtype, and (`weights`) the weight
    tensors' names, shapes or dtypes. Plans without a weights fingerprint (older ones, or made when the folder
    had no weights) are compared by config only."""
    changes = []
    for key in ("family", "dtype"):
        if key in planned and planned[key] != getattr(spec, key):
            changes.append(f"{key} {_short(planned[key])} -> {_short(getattr(spec, key))}")
    old = planned.get("hf_config") or {}
    new = json.loads(json.dumps(spec.hf_config, default=str))
    for key in sorted((set(old) | set(new)) - _NOT_ARCHITECTURE):
        if old.get(key, _ABSENT) != new.get(key, _ABSENT):
            changes.append(f"config.json {key} {_short(old.get(key, _ABSENT))} -> {_short(new.get(key, _ABSENT))}")
    before, now = planned.get("weights_fingerprint"), spec.weights_fingerprint
    if weights and before and now and before != now:
        changes.append("the weight tensors' names, shapes or dtypes")
    return changes


def check_plan_model(planned: dict[str, Any] | None, spec: ModelSpec, plan_file: str, *, weights: bool = True) -> None:
    """UserError when the model folder changed since the plan in `plan_file` was compiled for it (a plan's graph,
    tensor shapes and memory are the old model's: it would train and export a model that is neither)."""
    changes = plan_model_changes(planned or {}, spec, weights=weights)
    if changes:
        shown = "; ".join(changes[:5]) + (f"; and {len(changes) - 5} more" if len(changes) > 5 else "")
        where = spec.source_dir or spec.name
        raise UserError(f"model: the model folder {where} changed since the plan {plan_file} was made ({shown}); "
                        "re-run `surogate plan` on the config to rebuild it")
