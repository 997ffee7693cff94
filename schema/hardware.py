"""What a config needs of the GPU, written once: `surogate validate` / `surogate plan` notices, the plan
report's hardware line and the runtime's refusal all derive from `gpu_requirements`.

Compute capabilities are integers `major * 10 + minor` (SM89 = 89, SM100 = 100), as NVIDIA writes them.
A *hard* requirement cannot run below its SM (no FP4 / FP8 tensor-core fallback exists for the training
recipes); a soft one runs there more slowly. The contract (configuration.md) names the hard ones:
recipes `fp8_hybrid` (SM89+), `nvfp4` / `nvfp4_quartet` (SM100+) and `qlora_fp4` (SM100+). It gives
`qlora_fp8` no hardware requirement: below SM89 its FP8 base weights are dequantized for each matmul,
so there it is a warning at run time, not a refusal. Validation cannot know the GPU: it lists both kinds
as requirement notices (a soft one saying what happens below its SM); only hard ones are refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

FP4_RECIPES = ("nvfp4", "nvfp4_quartet")
FP8_SM, FP4_SM = 89, 100


@dataclass(frozen=True)
class Requirement:
    """One option's need of the GPU: `field` (the option), `min_sm` (e.g. 100), `what` (in words)."""

    field: str
    min_sm: int
    what: str
    hard: bool = True  # False: runs below `min_sm` through a slower fallback

    @property
    def sm(self) -> str:
        return f"SM{self.min_sm}+"


def _options(cfg: Any) -> Mapping[str, Any]:
    if isinstance(cfg, Mapping):
        return cfg
    to_dict = getattr(cfg, "to_dict", None)
    return to_dict() if callable(to_dict) else vars(cfg)


def gpu_requirements(cfg: Any) -> list[Requirement]:
    """Every GPU requirement of a config (a TrainConfig or a resolved / plan config dict), hard ones first."""
    opts = _options(cfg)
    recipe = opts.get("recipe") or "bf16"
    reqs: list[Requirement] = []
    if recipe in FP4_RECIPES:
        reqs.append(Requirement("recipe", FP4_SM, f"recipe {recipe!r} needs an NVIDIA Blackwell GPU (SM100+) at run time"))
    if opts.get("qlora_fp4"):
        reqs.append(Requirement("qlora_fp4", FP4_SM, "NVFP4 QLoRA needs an NVIDIA Blackwell GPU (SM100+) at run time"))
    if recipe == "fp8_hybrid":
        reqs.append(Requirement("recipe", FP8_SM, "recipe 'fp8_hybrid' needs an FP8-capable GPU (SM89+: Ada, Hopper, "
                                                  "Blackwell) at run time"))
    if opts.get("qlora_fp8"):
        reqs.append(Requirement("qlora_fp8", FP8_SM, "FP8 QLoRA: FP8 matmuls need an SM89+ GPU (Ada, Hopper, "
                                                     "Blackwell); on older GPUs the FP8 base weights are "
                                                     "dequantized for each matmul instead (slower)", hard=False))
    return sorted(reqs, key=lambda r: (not r.hard, -r.min_sm))


def min_compute_capability(cfg: Any) -> tuple[int, list[Requirement]]:
    """The lowest SM the config runs on (0: any CUDA GPU) and the hard requirements that set it."""
    hard = [r for r in gpu_requirements(cfg) if r.hard]
    need = max((r.min_sm for r in hard), default=0)
    return need, [r for r in hard if r.min_sm == need]


def sm_of(capability: tuple[int, int] | list[int]) -> int:
    """(major, minor) as torch / the plan report give it -> 89, 100, ..."""
    major, minor = capability
    return int(major) * 10 + int(minor)
