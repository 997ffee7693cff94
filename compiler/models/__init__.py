"""Model resolution (config.json / HF cache / presets) and architecture graph builders."""

from surogate.compiler.models.families import BUILDERS, build_forward_graph
from surogate.compiler.models.presets import PRESETS, find_preset
from surogate.compiler.models.resolve import resolve_model
from surogate.compiler.models.spec import ALL_PROJ, ModelSpec

__all__ = ["ALL_PROJ", "BUILDERS", "PRESETS", "ModelSpec", "build_forward_graph", "find_preset", "resolve_model"]
