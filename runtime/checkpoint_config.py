"""Which options a resumed run must share with the run that saved its checkpoint (the config fingerprint)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from surogate.errors import UserError

# Options that change neither the weights' trajectory nor the data order: a resume may change them.
_RESUME_FREE = {
    "run_name", "output_dir", "checkpoint_dir", "resume_from_checkpoint", "save_steps", "save_total_limit",
    "eval_steps", "report_to", "log_file", "log_gpu_util", "wandb_project", "wandb_name", "aim_experiment",
    "aim_repo", "aim_name", "debug_time_breakdown", "debug_memory_breakdown", "dataloader_num_workers",
    "use_cuda_graphs", "num_epochs", "max_steps", "early_stop", "distributed",
}


# Options that change where tensors live or what is recomputed, not a step's arithmetic or the checkpoint's tensors:
# a resume may change them (a run that no longer fits resumes with recompute or offloading on), and says so.
# Kept beside the fingerprint (`placement`), not in its hash; checkpoints from before kept them among its options.
# (use_fused_rope: RoPE's cos/sin computed in each kernel instead of read from a table, the same fp32 formula)
_PLACEMENT_FREE = {"recompute", "offload_residual", "offload_master", "offload_optimizer", "offload_grads",
                   "use_zero_copy", "use_write_combined", "lmhead_chunks", "attn_bwd_chunks", "use_fused_rope"}

# The rank count, ZeRO layout and sequence-parallel split may change on resume (the checkpoint is resharded,
# `runtime.distributed.reshard`; a rank's tensors do not depend on the split); the global batch may not:
# accumulation x data-parallel replicas (ranks / sequence_parallel_size) is what must match.
_LAYOUT_FREE = {"gpus", "zero_level", "shard_weights", "shard_gradients", "sequence_parallel_size"}
GLOBAL_ACCUMULATION = "gradient_accumulation_steps x data-parallel replicas"
_OLD_NAMES = {"gradient_accumulation_steps x ranks": GLOBAL_ACCUMULATION}  # names in checkpoints before the split


def config_fingerprint(cfg: Any) -> dict[str, Any]:
    """The options a resumed run must share with the run that saved (JSON-able), plus their hash."""
    from surogate.compiler.passes.zero import world_size

    data = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(vars(cfg))
    kept = {k: v for k, v in sorted(data.items()) if k not in _RESUME_FREE | _LAYOUT_FREE | _PLACEMENT_FREE}
    if "gradient_accumulation_steps" in kept:
        sp = int(data.get("sequence_parallel_size") or 1)
        kept[GLOBAL_ACCUMULATION] = int(kept.pop("gradient_accumulation_steps")) * world_size(cfg)[0] // sp
    digest = hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()
    placement = {k: data[k] for k in sorted(_PLACEMENT_FREE) if k in data}
    return {"hash": digest, "options": kept, "placement": json.loads(json.dumps(placement, default=str))}


def is_fingerprint(value: Any) -> bool:
    return isinstance(value, dict) and {"hash", "options"} <= set(value) <= {"hash", "options", "placement"}


class ConfigMismatchError(UserError):
    """A checkpoint written with other options than this run's: the resume adds how to proceed."""


class MovedPathsError(ConfigMismatchError):
    """The only options that differ name files by path (`MOVABLE`): a resume may take them as moved when the
    checkpoint's record of its data's and weights' content (run_identity.py) agrees with this run's."""

    def __init__(self, message: str, moved: list[str], changes: list[str]) -> None:
        super().__init__(message)
        self.moved, self.changes = moved, changes


# Options naming files by path, whose content the checkpoint's identity record covers: the model (its weight files and
# config.json), an adapter merged into it, and the datasets' files (the tokenized data). Projects move; clusters mount
# the same files under other paths.
MOVABLE = frozenset({"model", "adapter_path"})
MOVABLE_DATASET_FIELDS = frozenset({"path"})


def _diffs(name: str, old: Any, new: Any) -> list[str]:
    """`name: old -> new` for each differing leaf: inside options holding objects or lists of objects (a dataset's
    path), the leaf's own name (`datasets[0].path`), not the whole value; a list entry added or removed by its path."""
    if old == new:
        return []
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new)) for d in _diffs(f"{name}.{k}", old.get(k), new.get(k))]
    if isinstance(old, list) and isinstance(new, list) and old and new and all(isinstance(x, dict) for x in old + new):
        common = [d for i, (a, b) in enumerate(zip(old, new, strict=False)) for d in _diffs(f"{name}[{i}]", a, b)]
        extra = [f"{name}[{i}]: {_short(item)} {'removed' if len(old) > len(new) else 'added'}"
                 for i, item in enumerate(old if len(old) > len(new) else new) if i >= min(len(old), len(new))]
        return common + extra
    return [f"{name}: {old!r} -> {new!r}"]


def _short(item: Any) -> str:
    """A list entry in few words: a dataset by its path."""
    return repr(item["path"]) if isinstance(item, dict) and "path" in item else repr(item)


def check_config_compatible(saved: dict[str, Any], current: dict[str, Any], where: str | Path) -> list[str]:
    """ConfigMismatchError naming each option whose value differs between the saved and the current fingerprint;
    else the memory and speed options (`_PLACEMENT_FREE`) that changed, as `name: old -> new`."""
    saved_options = saved.get("options", {})
    before = {**{k: v for k, v in saved_options.items() if k in _PLACEMENT_FREE}, **(saved.get("placement") or {})}
    after = current.get("placement") or {}
    changed = [f"{k}: {before[k]!r} -> {after[k]!r}" for k in sorted(after) if k in before and before[k] != after[k]]
    if saved.get("hash") == current.get("hash"):
        return changed
    # (checkpoints from before sequence_parallel_size was free kept it, and named the global batch otherwise)
    old = {_OLD_NAMES.get(k, k): v for k, v in saved_options.items() if k not in _PLACEMENT_FREE | _LAYOUT_FREE}
    new = current.get("options", {})
    if old == new:  # (a checkpoint whose hash covered the placement options too)
        return changed
    diffs = [d for k in sorted(set(old) | set(new)) for d in _diffs(k, old.get(k), new.get(k))]
    message = (f"checkpoint {where} was written with a different config; cannot resume. Differences: "
               + ("; ".join(diffs) if diffs else "(config hash differs)") + ". To resume it, put those options back")
    if _without_paths(old) == _without_paths(new):
        raise MovedPathsError(message, diffs, changed)
    raise ConfigMismatchError(message)


def _without_paths(options: dict[str, Any]) -> dict[str, Any]:
    """`options` with the values of the movable options (`MOVABLE`, and each dataset's file fields) blanked."""
    out = {k: None if k in MOVABLE else v for k, v in options.items()}
    for key in ("datasets", "validation_datasets"):
        if isinstance(out.get(key), list):
            out[key] = [{f: None if f in MOVABLE_DATASET_FIELDS else v for f, v in d.items()} if isinstance(d, dict)
                        else d for d in out[key]]
    return out
