"""RoPE configuration: `max_model_len` / `rope_scaling` overrides and the inverse frequencies.

Frequencies are computed once at compile time with `transformers`' own rope functions (so every
scaling type matches Hugging Face exactly) and stored on the `rope` ops as attributes.
"""

from __future__ import annotations

import json
import math
from typing import Any

from surogate.errors import UserError

SCALING_TYPES = ("linear", "dynamic", "yarn", "llama3")
_KNOWN_TYPES = ("default", *SCALING_TYPES, "longrope")


def rope_params(hf_config: dict[str, Any]) -> dict[str, Any]:
    """The rope parameters of a config.json, old (`rope_theta`+`rope_scaling`) or new (`rope_parameters`) form."""
    params = dict(hf_config.get("rope_parameters") or {})
    scaling = hf_config.get("rope_scaling") or {}
    params.update({k: v for k, v in scaling.items() if k not in params})
    if "rope_type" not in params:
        params["rope_type"] = params.pop("type", "default")
    params.pop("type", None)
    params.setdefault("rope_theta", float(hf_config.get("rope_theta", 10000.0)))
    return params


def apply_rope_overrides(
    hf_config: dict[str, Any], max_model_len: int | None, rope_scaling: str | None
) -> tuple[dict[str, Any], int, dict[str, Any]]:
    """Return (config with the overrides applied, the model's maximum length, rope parameters)."""
    cfg = dict(hf_config)
    params = rope_params(cfg)
    native = int(cfg.get("max_position_embeddings") or 0) or None
    if max_model_len is not None and max_model_len < 1:
        raise UserError(f"max_model_len: must be positive, got {max_model_len}")
    if rope_scaling:
        params = _scaling_override(params, rope_scaling, max_model_len, native)
        if params["rope_type"] != "dynamic" and max_model_len:
            # dynamic NTK reads the native length from max_position_embeddings; the others keep it in params.
            cfg["max_position_embeddings"] = max_model_len
    max_len = int(max_model_len or native or 0) or 1 << 30
    cfg.pop("rope_parameters", None)
    cfg["rope_theta"] = params["rope_theta"]
    scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    cfg["rope_scaling"] = None if scaling.get("rope_type") == "default" and len(scaling) == 1 else scaling
    return cfg, max_len, params


def _scaling_override(params: dict[str, Any], option: str, max_model_len: int | None, native: int | None) -> dict[str, Any]:
    text = option.strip()
    if text.startswith("{"):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"rope_scaling: not valid JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise UserError("rope_scaling: the JSON value must be an object such as {\"type\": \"yarn\", \"factor\": 2.0}")
        rtype = obj.get("rope_type", obj.get("type"))
        if rtype not in _KNOWN_TYPES:
            raise UserError(f"rope_scaling: unknown type {rtype!r} (expected one of {', '.join(_KNOWN_TYPES)})")
        new = {k: v for k, v in obj.items() if k != "type"}
        new["rope_type"] = rtype
        if rtype != "default" and not isinstance(new.get("factor"), (int, float)):
            raise UserError(f"rope_scaling: type {rtype!r} needs a numeric \"factor\"")
        new.setdefault("rope_theta", params["rope_theta"])
        if rtype in ("yarn", "llama3", "longrope"):
            new.setdefault("original_max_position_embeddings",
                           params.get("original_max_position_embeddings", native))
        return new
    if text not in SCALING_TYPES:
        raise UserError(f"rope_scaling: unknown type {text!r} (expected one of {', '.join(SCALING_TYPES)} or a JSON object)")
    if not max_model_len:
        raise UserError(f"rope_scaling: {text!r} needs max_model_len (the length to scale the model to)")
    original = int(params.get("original_max_position_embeddings") or native or 0)
    if not original:
        raise UserError("rope_scaling: the model config has no max_position_embeddings to scale from")
    factor = max_model_len / original
    if factor <= 1.0:
        raise UserError(
            f"rope_scaling: max_model_len ({max_model_len}) must exceed the model's native length ({original}) "
            "for rope scaling to do anything"
        )
    new = {"rope_type": text, "factor": factor, "rope_theta": params["rope_theta"]}
    if text in ("yarn", "llama3"):
        new["original_max_position_embeddings"] = original
    if text == "llama3":
        new["low_freq_factor"] = params.get("low_freq_factor", 1.0)
        new["high_freq_factor"] = params.get("high_freq_factor", 4.0)
    return new


def inv_freq(hf_config: dict[str, Any], head_dim: int, seq_len: int) -> tuple[list[float], float]:
    """(inverse frequencies, attention scaling) for `seq_len` positions, exactly as transformers computes them."""
    params = rope_params(hf_config)
    rtype = params["rope_type"]
    if rtype == "default":
        base = float(params["rope_theta"])
        return [1.0 / (base ** (i / head_dim)) for i in range(0, head_dim, 2)], 1.0
    import torch
    from transformers import PretrainedConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    conf = PretrainedConfig()
    for key in ("hidden_size", "num_attention_heads", "max_position_embeddings"):
        setattr(conf, key, hf_config.get(key))
    conf.head_dim = head_dim
    conf.rope_parameters = dict(params)
    native = int(hf_config.get("max_position_embeddings") or seq_len)
    kwargs: dict[str, Any] = {}
    if rtype == "dynamic" and seq_len > native:
        kwargs["seq_len"] = seq_len  # HF grows dynamic NTK frequencies once the sequence passes the native length
    if rtype not in ROPE_INIT_FUNCTIONS:
        raise UserError(f"model: config.json rope_parameters: unknown rope_type {rtype!r} (transformers knows "
                        f"{', '.join(sorted(ROPE_INIT_FUNCTIONS))})")
    try:
        freqs, scale = ROPE_INIT_FUNCTIONS[rtype](conf, torch.device("cpu"), **kwargs)
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:  # a parameter missing or of the wrong type
        what = f"lacks {exc}" if isinstance(exc, KeyError) else f"{type(exc).__name__}: {exc}"
        raise UserError(f"model: config.json rope_parameters ({rtype}) {what}; rope parameters: {dict(params)}") \
            from None
    if rtype == "dynamic" and seq_len <= native:
        base = float(params["rope_theta"])
        return [1.0 / (base ** (i / head_dim)) for i in range(0, head_dim, 2)], 1.0
    return [float(x) for x in freqs.tolist()], float(scale if scale is not None and not math.isnan(scale) else 1.0)
