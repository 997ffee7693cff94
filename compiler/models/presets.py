"""Built-in architecture presets: the `config.json` of well-known hub models, so that `surogate plan`
works offline with no weights. Transcribed from the published configs; only fields that shape the
model (and its dtype / rope) are kept. Lookup is case-insensitive and accepts the listed aliases.
"""

from __future__ import annotations

from typing import Any


def _qwen3(hidden: int, inter: int, layers: int, heads: int, kv: int, tie: bool) -> dict[str, Any]:
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": 128,
        "vocab_size": 151936,
        "max_position_embeddings": 40960,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "rope_scaling": None,
        "attention_bias": False,
        "hidden_act": "silu",
        "tie_word_embeddings": tie,
        "torch_dtype": "bfloat16",
        "bos_token_id": 151643,
        "eos_token_id": 151645,
    }


def _qwen25(hidden: int, inter: int, layers: int, heads: int, kv: int, tie: bool, vocab: int = 151936,
            max_pos: int = 32768) -> dict[str, Any]:
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "vocab_size": vocab,
        "max_position_embeddings": max_pos,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "rope_scaling": None,
        "hidden_act": "silu",
        "tie_word_embeddings": tie,
        "torch_dtype": "bfloat16",
        "bos_token_id": 151643,
        "eos_token_id": 151643,
    }


def _llama3(hidden: int, inter: int, layers: int, heads: int, kv: int, tie: bool, factor: float,
            head_dim: int | None = None) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": head_dim or hidden // heads,
        "vocab_size": 128256,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": factor,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        "attention_bias": False,
        "mlp_bias": False,
        "hidden_act": "silu",
        "tie_word_embeddings": tie,
        "torch_dtype": "bfloat16",
        "bos_token_id": 128000,
        "eos_token_id": 128001,
    }


QWEN3_30B_A3B: dict[str, Any] = {
    **_qwen3(2048, 6144, 48, 32, 4, False),
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "moe_intermediate_size": 768,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "router_aux_loss_coef": 0.001,
    "output_router_logits": False,
}

# Canonical id -> config. Aliases (Instruct/Base variants share the architecture) map below.
PRESETS: dict[str, dict[str, Any]] = {
    "Qwen/Qwen3-0.6B": _qwen3(1024, 3072, 28, 16, 8, True),
    "Qwen/Qwen3-1.7B": _qwen3(2048, 6144, 28, 16, 8, True),
    "Qwen/Qwen3-4B": _qwen3(2560, 9728, 36, 32, 8, True),
    "Qwen/Qwen3-8B": _qwen3(4096, 12288, 36, 32, 8, False),
    "Qwen/Qwen3-14B": _qwen3(5120, 17408, 40, 40, 8, False),
    "Qwen/Qwen3-32B": _qwen3(5120, 25600, 64, 64, 8, False),
    "Qwen/Qwen3-30B-A3B": QWEN3_30B_A3B,
    "Qwen/Qwen2.5-0.5B": _qwen25(896, 4864, 24, 14, 2, True),
    "Qwen/Qwen2.5-1.5B": _qwen25(1536, 8960, 28, 12, 2, True),
    "Qwen/Qwen2.5-3B": _qwen25(2048, 11008, 36, 16, 2, True),
    "Qwen/Qwen2.5-7B": _qwen25(3584, 18944, 28, 28, 4, False, vocab=152064),
    "meta-llama/Llama-3.2-1B": _llama3(2048, 8192, 16, 32, 8, True, 32.0, head_dim=64),
    "meta-llama/Llama-3.2-3B": _llama3(3072, 8192, 28, 24, 8, True, 32.0, head_dim=128),
    "meta-llama/Llama-3.1-8B": _llama3(4096, 14336, 32, 32, 8, False, 8.0),
    "meta-llama/Llama-3.1-70B": _llama3(8192, 28672, 80, 64, 8, False, 8.0),
}

_ALIASES: dict[str, str] = {}
for _canon in PRESETS:
    org, name = _canon.split("/")
    variants = [name, f"{name}-Base", f"{name}-Instruct"]
    if org == "meta-llama" and name.startswith("Llama-3.1"):
        variants += [f"Meta-{name}", f"Meta-{name}-Instruct"]
    for v in variants:
        _ALIASES[f"{org}/{v}".lower()] = _canon
_ALIASES["qwen/qwen3-30b-a3b-instruct-2507"] = "Qwen/Qwen3-30B-A3B"


def find_preset(model_id: str) -> tuple[str, dict[str, Any]] | None:
    """The (canonical id, config dict copy) for a well-known hub id, or None."""
    canon = _ALIASES.get(model_id.strip().lower())
    if canon is None:
        return None
    return canon, _deepcopy(PRESETS[canon])


def preset_ids() -> list[str]:
    return sorted(PRESETS)


def _deepcopy(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (_deepcopy(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else v) for k, v in d.items()}
