"""The end-of-run outputs of a session: the PEFT adapter (and the merged model), or the full model, in Hugging
Face format under `output_dir`, with the chat template the run trained with (runtime/export.py writes them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from surogate.compiler.ir import Role

EXPORT_FOLDERS = ("adapter", "merged", "model")  # what a run writes under output_dir at its end (atomically)
EXPORTED_BY_FILE = ".surogate-exports.json"  # in output_dir: export folder -> the checkpoint line that wrote it


def exported_by(output_dir: str | Path) -> dict[str, str]:
    """Export folder name -> the id of the checkpoint line (`CheckpointManager.line_id`) whose run exported it;
    folders exported before the record existed, or an unreadable record, are left out."""
    import json

    try:
        record = json.loads((Path(output_dir) / EXPORTED_BY_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(record, dict):
        return {}
    return {k: v["run"] for k, v in record.items()
            if k in EXPORT_FOLDERS and isinstance(v, dict) and isinstance(v.get("run"), str)}


def _record_exports(output_dir: Path, outputs: dict[str, str], line: str | None, step: int) -> None:
    """Note which checkpoint line exported each folder (a later run resuming another line refuses to replace
    them: runtime/resume.py)."""
    import json

    from surogate.runtime.atomic_files import write_atomic_text

    if line is None or not outputs:
        return
    record = {name: {"run": run} for name, run in exported_by(output_dir).items()}
    record |= {name: {"run": line, "step": int(step)} for name in outputs if name in EXPORT_FOLDERS}
    write_atomic_text(output_dir / EXPORTED_BY_FILE, json.dumps(record, indent=1, sort_keys=True) + "\n")


def export_outputs(trainer: Any, cfg: Any, model_dir: Path | None, hf_config: dict, tokenizer: Any) -> dict[str, str]:
    """HF-compatible outputs under `output_dir`: adapter (+ merged), or the full model. Multi-rank: every rank
    gathers the sharded weights (collective), rank 0 writes."""
    from surogate.runtime.data.options import data_options
    from surogate.runtime.data.templates import inference_template
    from surogate.runtime.distributed import comm
    from surogate.runtime.distributed.shards import full_views
    from surogate.runtime.export import (
        PEFT_PREFIX,
        export_hf_model,
        export_merged_model,
        export_peft_adapter,
    )
    from surogate.runtime.weights import unquantized_base_weights

    plan, ex = trainer.plan, trainer.ex
    ex.synchronize()  # offloaded weights are read by the host
    views = {n: ex.readable(n) for n in ex.views if plan.tensors[n].role in (Role.TRAINABLE_WEIGHT, Role.FROZEN_WEIGHT)}
    if comm.world() > 1:
        views = full_views(plan, views)
        if comm.rank() != 0:
            return {}
    out = Path(cfg.output_dir)
    by_role = lambda roles: {  # noqa: E731 - tiny local selector
        plan.tensors[n].source: v for n, v in views.items() if plan.tensors[n].role in roles and plan.tensors[n].source
    }
    outputs: dict[str, str] = {}
    # the model folders carry the tokenizer (its own files without a source folder) and the training template
    folder = {"tokenizer": tokenizer, "chat_template": inference_template(tokenizer, data_options(cfg))}
    lora = {src.removeprefix(PEFT_PREFIX): v for src, v in by_role((Role.TRAINABLE_WEIGHT,)).items()
            if ".lora_" in src}
    if lora:
        # weights trained in full beside the adapters (train_router) travel as PEFT `modules_to_save`
        full = {src: v for src, v in by_role((Role.TRAINABLE_WEIGHT,)).items() if ".lora_" not in src}
        outputs["adapter"] = str(export_peft_adapter(out / "adapter", lora, lora_alpha=float(cfg.lora_alpha),
                                                     lora_dropout=float(cfg.lora_dropout),
                                                     base_model_name_or_path=str(cfg.model),
                                                     modules_to_save=full))
        if cfg.merge_adapter:
            # every non-LoRA weight: frozen ones and those trained in full beside the adapters (train_router)
            base = {src: v for src, v in by_role((Role.FROZEN_WEIGHT, Role.TRAINABLE_WEIGHT)).items()
                    if ".lora_" not in src}
            base |= unquantized_base_weights(plan, model_dir, cfg.adapter_path)
            outputs["merged"] = str(export_merged_model(out / "merged", base, lora, hf_config, model_dir,
                                                        lora_alpha=float(cfg.lora_alpha), **folder))
    else:
        weights = by_role((Role.TRAINABLE_WEIGHT, Role.FROZEN_WEIGHT))
        outputs["model"] = str(export_hf_model(out / "model", weights, hf_config, model_dir, **folder))
    checkpoints = getattr(trainer, "checkpoints", None)
    _record_exports(out, outputs, checkpoints.line_id() if checkpoints is not None else None,
                    getattr(trainer, "step", 0))
    return outputs
