"""Model resolution (config.json / presets / HF cache) and architecture graph builders."""

from __future__ import annotations

from typing import Any

from surogate.compiler.ir import Graph


class ModelSpec:  # replaced by the real dataclass shortly
    pass


def resolve_model(cfg: Any) -> ModelSpec:
    raise NotImplementedError("resolve_model is being written (C1)")


def build_forward_graph(spec: ModelSpec, cfg: Any) -> Graph:
    raise NotImplementedError("build_forward_graph is being written (C1)")


__all__ = ["ModelSpec", "resolve_model", "build_forward_graph"]
