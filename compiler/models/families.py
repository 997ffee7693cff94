"""Family -> graph builder. Adding a family = registering a builder (most reuse `build_decoder`,
switching parts on through `ModelSpec` properties such as `qkv_bias`, `qk_norm`, `num_experts`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from surogate.compiler.ir import Graph
from surogate.compiler.models.builder import build_decoder
from surogate.compiler.models.spec import ModelSpec

BUILDERS: dict[str, Callable[[ModelSpec, Any], Graph]] = {
    "llama": build_decoder,  # Llama 2/3: RMSNorm, GQA, SwiGLU, optional attention/mlp bias
    "qwen2": build_decoder,  # + q/k/v bias (spec.qkv_bias)
    "qwen3": build_decoder,  # + per-head q/k RMSNorm (spec.qk_norm)
    "qwen3_moe": build_decoder,  # + router and experts in sparse layers (spec.is_moe_layer)
}


def build_forward_graph(spec: ModelSpec, cfg: Any) -> Graph:
    """The forward graph of one micro-batch for `spec`'s family."""
    try:
        builder = BUILDERS[spec.family]
    except KeyError:
        raise ValueError(f"no graph builder for family {spec.family!r}") from None
    return builder(spec, cfg)
