"""Cross-field rules: what one option says about another.

Each rule is a small function over the config *with defaults applied* (`cfg`, a dict) and the set of
options the user wrote (`given`, top-level names and `datasets[i].name` paths). It yields
`ConfigIssue`s (errors: the config cannot run as written) and `Notice`s (warnings: an option that has no
effect in this configuration, or that another option overrides; requirements: hardware needed at run
time). An option that would be silently ignored is never silent: it is at least a warning.

This module holds the machinery (`Notice`, `rule`, `run_rules`) and the rules on how to train; the rules
on what is trained (rope scaling, sequence lengths, datasets) are in `input_rules`, registered here in
the same order as before, and GPU needs come from the one table in `hardware`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from surogate.errors import ConfigIssue
from surogate.schema.hardware import FP4_RECIPES, gpu_requirements
from surogate.schema.input_rules import (  # parse_rope_scaling: public, re-exported
    chat_template_known,
    dataset_rules,
    loss_scale_valid,
    parse_rope_scaling,
    rope_scaling_valid,
    sequence_lengths,
)

__all__ = ["RULES", "Finding", "Notice", "Rule", "parse_rope_scaling", "rule", "run_rules"]

QLORA_MODES = ("qlora_fp4", "qlora_fp8", "qlora_bnb")
QUANTIZED_RECIPES = ("fp8_hybrid", *FP4_RECIPES)


@dataclass(frozen=True)
class Notice:
    """A warning or a hardware requirement; does not stop validation."""

    kind: str  # "warning" | "requirement"
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


Finding = ConfigIssue | Notice
Rule = Callable[[dict[str, Any], set[str]], Iterator[Finding]]
RULES: list[Rule] = []


def rule(fn: Rule) -> Rule:
    RULES.append(fn)
    return fn


def _warn(path: str, message: str) -> Notice:
    return Notice("warning", path, message)


# -- offloading and ZeRO --------------------------------------------------------------------------


@rule
def offload_quants_needs_persistent_quants(cfg, given):
    if cfg["offload_quants"] and not cfg["persistent_quants"]:
        yield ConfigIssue("offload_quants", "requires `persistent_quants: true` (there are no stored quants to offload)", True)


@rule
def persistent_quants_needs_sharded_weights(cfg, given):
    if cfg["persistent_quants"] and not (cfg["shard_weights"] or cfg["zero_level"] >= 3):
        yield ConfigIssue("persistent_quants", "requires `shard_weights: true` (or `zero_level: 3`)", True)


@rule
def offload_grads_needs_sharded_grads(cfg, given):
    if cfg["offload_grads"] and not (cfg["shard_gradients"] or cfg["zero_level"] >= 2):
        yield ConfigIssue(
            "offload_grads", "requires `shard_gradients: true` or `zero_level >= 2`", True
        )


@rule
def persistent_quants_needs_quantized_weights(cfg, given):
    if cfg["persistent_quants"] and cfg["recipe"] not in QUANTIZED_RECIPES and not _qlora_modes(cfg):
        yield ConfigIssue(
            "persistent_quants",
            f"has nothing to keep: weights are only quantized with recipe {', '.join(QUANTIZED_RECIPES)} or a qlora_* mode",
            True,
        )


@rule
def host_memory_flags_need_offloading(cfg, given):
    offloading = any(
        cfg[k] for k in ("offload_residual", "offload_master", "offload_quants", "offload_optimizer", "offload_grads")
    )
    for key in ("use_zero_copy", "use_write_combined"):
        if cfg[key] and not offloading:
            yield _warn(key, "has no effect: nothing is offloaded (set one of the offload_* options)")


# -- precision ---------------------------------------------------------------------------------------


def _qlora_modes(cfg: dict[str, Any]) -> list[str]:
    return [m for m in QLORA_MODES if cfg[m]]


@rule
def one_qlora_mode(cfg, given):
    modes = _qlora_modes(cfg)
    if len(modes) > 1:
        yield ConfigIssue(modes[1], f"only one QLoRA mode may be on; also set: {', '.join(modes)}", True)


@rule
def qlora_needs_lora(cfg, given):
    for mode in _qlora_modes(cfg):
        if not cfg["lora"]:
            yield ConfigIssue(mode, "QLoRA trains LoRA adapters on a quantized base: requires `lora: true`", True)


@rule
def hardware_requirements(cfg, given):
    """GPU needs, from the one table in `schema.hardware` (a soft one says what happens below its SM)."""
    for req in gpu_requirements(cfg):
        yield Notice("requirement", req.field, req.what)


@rule
def fp8_gradient_dtype_needs_fp8_matmuls(cfg, given):
    """gradient_dtype fp8_e4m3 / fp8_e5m2 is a backward-matmul policy: the format dY is rounded through in the fp8
    projections' backward GEMMs. Activation gradients are not stored in fp8 (unscaled, they would underflow)."""
    if str(cfg["gradient_dtype"]).startswith("fp8") and cfg["recipe"] != "fp8_hybrid":
        yield ConfigIssue(
            "gradient_dtype",
            f"{cfg['gradient_dtype']!r} sets the fp8 format of the backward matmuls of recipe 'fp8_hybrid' (default "
            f"fp8_e5m2); recipe {cfg['recipe']!r} has no fp8 matmuls. Use `recipe: fp8_hybrid`, or fp32 / bf16 / fp16",
            True,
        )


@rule
def recipe_specific_options(cfg, given):
    if "fp8_amax_history" in given and cfg["recipe"] != "fp8_hybrid":
        yield _warn("fp8_amax_history", "only used by recipe 'fp8_hybrid'")
    if "fp4_backend" in given and cfg["recipe"] not in FP4_RECIPES:
        yield _warn("fp4_backend", f"only used by recipes {', '.join(FP4_RECIPES)}")
    quantized = cfg["recipe"] in QUANTIZED_RECIPES or _qlora_modes(cfg)
    for key in ("skip_quant_first_layers", "skip_quant_last_layers"):
        if cfg[key] and not quantized:
            yield _warn(key, "has no effect: no weights are quantized with recipe 'bf16' and no qlora_* mode")
    if "qlora_block_size" in given and not cfg["qlora_fp8"]:
        yield _warn("qlora_block_size", "only used with `qlora_fp8: true`")
    for key in ("qlora_bnb_block_size", "qlora_bnb_double_quant"):
        if key in given and not cfg["qlora_bnb"]:
            yield _warn(key, "only used with `qlora_bnb: true`")
    if "qlora_four_over_six" in given and not cfg["qlora_fp4"]:
        yield _warn("qlora_four_over_six", "only used with `qlora_fp4: true`")
    for key in ("qlora_offload_experts", "qlora_selective_expert_dequant"):
        if cfg[key] and not _qlora_modes(cfg):
            yield _warn(key, "has no effect: only used with a qlora_* mode (on a MoE model)")


# -- LoRA and training mode ------------------------------------------------------------------------


@rule
def template_needs_the_chat_template(cfg, given):
    if "template" in given and cfg["template"] is not None and cfg["use_chat_template"] is False:
        yield _warn("template", "has no effect with `use_chat_template: false` (samples are rendered without a "
                    "chat template)")


@rule
def lora_options_need_lora(cfg, given):
    if cfg["adapter_path"] and not cfg["lora"]:
        yield ConfigIssue("adapter_path", "requires `lora: true`", cfg["adapter_path"])
    if cfg["merge_adapter"] and not cfg["lora"]:
        yield ConfigIssue("merge_adapter", "requires `lora: true` (there is no adapter to merge)", True)
    if not cfg["lora"]:
        for key in ("lora_rank", "lora_alpha", "lora_dropout", "lora_dtype", "lora_target_modules"):
            if key in given:
                yield _warn(key, "has no effect with `lora: false`")


@rule
def lora_target_all_is_alone(cfg, given):
    targets = cfg["lora_target_modules"] or []
    if "all" in targets and len(targets) > 1:
        yield _warn("lora_target_modules", "'all' already covers every projection; the other entries are redundant")


@rule
def from_scratch_rules(cfg, given):
    if cfg["from_scratch"] and cfg["lora"]:
        yield ConfigIssue(
            "from_scratch", "training from random initialization trains every weight: set `lora: false`", True
        )
    if cfg["init_projections_to_zero"] and not cfg["from_scratch"]:
        yield _warn("init_projections_to_zero", "has no effect: only used when training from scratch "
                    "(`from_scratch: true`); the pre-trained projections are loaded as they are")
    if cfg["from_scratch"] and cfg["adapter_path"]:
        yield ConfigIssue("adapter_path", "cannot merge an adapter into randomly initialized weights", cfg["adapter_path"])


@rule
def optimizer_specific_options(cfg, given):
    if cfg["optimizer"] != "normuon":
        for key in ("normuon_momentum", "normuon_beta2", "normuon_cautious_wd"):
            if key in given:
                yield _warn(key, "only used with `optimizer: normuon`")


# -- schedule --------------------------------------------------------------------------------------


@rule
def warmup_steps_override_ratio(cfg, given):
    if cfg["warmup_steps"] and cfg["warmup_ratio"]:
        yield _warn("warmup_ratio", f"ignored: `warmup_steps: {cfg['warmup_steps']}` overrides it")


@rule
def wsd_needs_cooldown(cfg, given):
    if cfg["lr_scheduler_type"] == "wsd" and not cfg["cooldown_steps"]:
        yield _warn("cooldown_steps", "the 'wsd' schedule decays only during `cooldown_steps`; with 0 it stays constant")


@rule
def cooldown_after_a_decay(cfg, given):
    if cfg["cooldown_steps"] and cfg["lr_scheduler_type"] in ("linear", "cosine"):
        yield _warn("cooldown_steps", f"with `lr_scheduler_type: {cfg['lr_scheduler_type']}` the cooldown starts from "
                    "the LR the decay has reached by then, not from `learning_rate` (that is 'wsd', which holds "
                    "`learning_rate` until the cooldown); the LR never jumps back up")


@rule
def schedule_phases_fit_the_run(cfg, given):
    steps = cfg["max_steps"]
    if steps is None or steps <= 0:  # (derived from the data: the run's start summary checks it then)
        return
    warm, cool = cfg["warmup_steps"] or 0, cfg["cooldown_steps"] or 0
    if warm >= steps:
        yield _warn("warmup_steps", f"{warm} is not below max_steps ({steps}): the LR never reaches "
                    "`learning_rate`")
    elif cfg["lr_scheduler_type"] == "wsd" and cool and warm + cool > steps:
        yield _warn("cooldown_steps", f"warmup_steps + cooldown_steps ({warm} + {cool}) exceed max_steps ({steps}): "
                    "the cooldown is cut short")


@rule
def max_steps_not_zero(cfg, given):
    if cfg["max_steps"] == 0:
        yield ConfigIssue("max_steps", "got 0; use -1 (derive from epochs) or a positive number of steps", 0)


@rule
def evaluation_options_need_an_evaluation_set(cfg, given):
    if not cfg.get("validation_datasets") and not cfg["validation_split_ratio"]:
        for key in ("eval_steps", "eval_seed"):
            if key in given:
                yield _warn(key, "no evaluation runs: `validation_split_ratio` is 0 and no `validation_datasets` "
                            "are given")


@rule
def validation_split_unused_with_validation_datasets(cfg, given):
    if cfg.get("validation_datasets") and "validation_split_ratio" in given and cfg["validation_split_ratio"]:
        yield _warn("validation_split_ratio", "ignored: `validation_datasets` is set, so nothing is split off the "
                    "training data")


# -- model -----------------------------------------------------------------------------------------


rule(rope_scaling_valid)
rule(sequence_lengths)


@rule
def multimodal_options(cfg, given):
    for key in ("max_pixels", "norm_bbox", "multimodal_on_the_fly"):
        if cfg.get(key) is not None and key in given:
            yield _warn(key, "only used by multimodal models; the supported families (Llama, Qwen2, Qwen3, Qwen3-MoE) are text-only")


# -- parallelism -----------------------------------------------------------------------------------


@rule
def parallel_sizes(cfg, given):
    dist = cfg["distributed"]
    per_node = dist["gpus_per_node"] or cfg["gpus"]
    sp = cfg["sequence_parallel_size"]
    if sp > 1 and per_node:
        world = per_node * dist["num_nodes"]
        if world % sp:
            yield ConfigIssue(
                "sequence_parallel_size", f"got {sp}; must divide the number of GPUs ({world})", sp
            )
    if sp > 1 and cfg["sequence_len"] % sp:  # each rank of a group holds sequence_len / sp tokens of every row
        yield ConfigIssue("sequence_parallel_size", f"got {sp}; must divide sequence_len ({cfg['sequence_len']})", sp)
    if dist["num_nodes"] > 1 and dist["gpus_per_node"] == 0 and cfg["gpus"] == 0:
        yield ConfigIssue(
            "distributed.gpus_per_node", "multi-node training needs a GPU count: set it, or `gpus`", 0
        )
    single = per_node == 1 and dist["num_nodes"] == 1
    for key in ("memcpy_all_gather", "memcpy_send_recv", "use_all_to_all_reduce"):
        if cfg[key] and single:
            yield _warn(key, "has no effect on a single GPU")
        elif cfg[key] and key != "use_all_to_all_reduce":
            # the reference's threads backend shares one address space; Surogate's ranks are processes
            yield _warn(key, "applies to the threads backend only; Surogate's ranks are processes "
                             "(torch.distributed: NCCL on GPUs, gloo on CPU), so it has no effect")


# -- data ------------------------------------------------------------------------------------------

rule(dataset_rules)
rule(chat_template_known)
rule(loss_scale_valid)


# -- logging ---------------------------------------------------------------------------------------


@rule
def padding_free_needs_no_packing(cfg, given):
    if cfg["padding_free"] and cfg["sample_packing"]:
        yield _warn("padding_free", "has no effect with `sample_packing: true` (packing already fills rows without "
                    "padding); set `sample_packing: false` to concatenate documents in dataset order instead")


@rule
def reporter_options(cfg, given):
    report_to = cfg["report_to"] or []
    for key in ("wandb_project", "wandb_name"):
        if key in given and "wandb" not in report_to:
            yield _warn(key, "has no effect: 'wandb' is not in `report_to`")
    for key in ("aim_experiment", "aim_repo", "aim_name"):
        if key in given and "aim" not in report_to:
            yield _warn(key, "has no effect: 'aim' is not in `report_to`")


def run_rules(
    cfg: dict[str, Any], given: set[str], *, tolerate_malformed: bool = False
) -> tuple[list[ConfigIssue], list[Notice]]:
    """Apply every rule; returns (errors, notices).

    With `tolerate_malformed` (the config already has type errors), a rule that fails on a malformed
    value is skipped instead of raising.
    """
    errors: list[ConfigIssue] = []
    notices: list[Notice] = []
    for fn in RULES:
        try:
            findings = list(fn(cfg, given))
        except (TypeError, KeyError, AttributeError, ValueError):
            if not tolerate_malformed:
                raise
            continue
        for finding in findings:
            (errors if isinstance(finding, ConfigIssue) else notices).append(finding)
    return errors, notices
