"""`ModelSpec`: the resolved model (family, Hugging Face config, where its weights are, dtype, rope) plus
architecture-level parameter counts that tests check against `transformers` models built on `meta`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Projections LoRA can target, per family part. `all` expands to the seven dense projections.
ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJ = ("gate_proj", "up_proj", "down_proj")
ALL_PROJ = ATTN_PROJ + MLP_PROJ

TORCH_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "bf16": "bf16", "fp16": "fp16",
                "fp32": "fp32", "half": "fp16", "float": "fp32"}


@dataclass
class ModelSpec:
    """A resolved model. `hf_config` is the config.json dict after `max_model_len`/`rope_scaling` overrides."""

    name: str
    family: str
    hf_config: dict[str, Any]
    source_dir: Path | None
    dtype: str
    max_model_len: int
    rope: dict[str, Any] = field(default_factory=dict)
    preset: str | None = None
    # SHA-256 of the folder's weight tensor names, dtypes and shapes (safetensors headers); None without weights.
    # A plan keeps it (meta["spec"]) so that `surogate run` notices a model folder changed since the plan.
    weights_fingerprint: str | None = None

    # -- architecture ------------------------------------------------------------------------------
    def _get(self, key: str, default: Any = None) -> Any:
        return self.hf_config.get(key, default)

    @property
    def hidden_size(self) -> int:
        return int(self._get("hidden_size"))

    @property
    def num_layers(self) -> int:
        return int(self._get("num_hidden_layers"))

    @property
    def num_heads(self) -> int:
        return int(self._get("num_attention_heads"))

    @property
    def num_kv_heads(self) -> int:
        return int(self._get("num_key_value_heads") or self.num_heads)

    @property
    def head_dim(self) -> int:
        return int(self._get("head_dim") or self.hidden_size // self.num_heads)

    @property
    def intermediate_size(self) -> int:
        return int(self._get("intermediate_size"))

    @property
    def vocab_size(self) -> int:
        return int(self._get("vocab_size"))

    @property
    def tie_word_embeddings(self) -> bool:
        return bool(self._get("tie_word_embeddings", False))

    @property
    def rms_norm_eps(self) -> float:
        return float(self._get("rms_norm_eps", 1e-6))

    @property
    def qkv_bias(self) -> bool:
        if self.family == "qwen2":
            return True
        return bool(self._get("attention_bias", False))

    @property
    def o_bias(self) -> bool:
        # Llama's `attention_bias` also puts a bias on o_proj; Qwen2 has q/k/v bias only.
        return self.family != "qwen2" and bool(self._get("attention_bias", False))

    @property
    def mlp_bias(self) -> bool:
        return bool(self._get("mlp_bias", False))

    @property
    def qk_norm(self) -> bool:
        return self.family in ("qwen3", "qwen3_moe")

    @property
    def num_experts(self) -> int:
        if self.family != "qwen3_moe":
            return 0
        # transformers 5 writes `num_local_experts`; hub configs say `num_experts`
        return int(self._get("num_experts") or self._get("num_local_experts") or 0)

    @property
    def experts_per_token(self) -> int:
        return int(self._get("num_experts_per_tok", 0) or 0)

    @property
    def moe_intermediate_size(self) -> int:
        return int(self._get("moe_intermediate_size", 0) or 0)

    def is_moe_layer(self, layer: int) -> bool:
        """Qwen3-MoE: sparse unless listed in `mlp_only_layers`, every `decoder_sparse_step`-th layer."""
        if not self.num_experts:
            return False
        if layer in (self._get("mlp_only_layers") or []):
            return False
        step = int(self._get("decoder_sparse_step", 1) or 1)
        return (layer + 1) % step == 0

    # -- parameter counts --------------------------------------------------------------------------
    def proj_shapes(self, layer: int) -> dict[str, tuple[int, int]]:
        """(out_features, in_features) of each dense projection of `layer` (MLP ones absent in MoE layers)."""
        h, hd = self.hidden_size, self.head_dim
        shapes = {
            "q_proj": (self.num_heads * hd, h),
            "k_proj": (self.num_kv_heads * hd, h),
            "v_proj": (self.num_kv_heads * hd, h),
            "o_proj": (h, self.num_heads * hd),
        }
        if not self.is_moe_layer(layer):
            i = self.intermediate_size
            shapes.update(gate_proj=(i, h), up_proj=(i, h), down_proj=(h, i))
        return shapes

    def layer_param_count(self, layer: int) -> int:
        h, hd = self.hidden_size, self.head_dim
        n = sum(o * i for o, i in self.proj_shapes(layer).values())
        n += 2 * h  # input / post-attention RMSNorm
        if self.qkv_bias:
            n += (self.num_heads + 2 * self.num_kv_heads) * hd
        if self.o_bias:
            n += h
        if self.mlp_bias and not self.is_moe_layer(layer):
            n += 2 * self.intermediate_size + h
        if self.qk_norm:
            n += 2 * hd
        if self.is_moe_layer(layer):
            e, mi = self.num_experts, self.moe_intermediate_size
            n += e * h + e * 3 * mi * h  # router + experts (gate, up, down)
        return n

    def param_count(self) -> int:
        """Total parameters, counting tied embeddings once (as `model.num_parameters()` does)."""
        emb = self.vocab_size * self.hidden_size
        n = emb + self.hidden_size + sum(self.layer_param_count(i) for i in range(self.num_layers))
        return n if self.tie_word_embeddings else n + emb

    def lora_param_count(self, rank: int, targets: tuple[str, ...] = ALL_PROJ, train_router: bool = False) -> int:
        """Trainable LoRA parameters (A: r x in, B: out x r per targeted projection), as PEFT counts them."""
        n = 0
        for layer in range(self.num_layers):
            for name, (o, i) in self.proj_shapes(layer).items():
                if name in targets:
                    n += rank * (o + i)
            if train_router and self.is_moe_layer(layer):
                n += self.num_experts * self.hidden_size
        return n
