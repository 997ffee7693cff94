"""Hugging Face compatible outputs: a PEFT LoRA adapter, a merged model, a full model.

Inputs are plain tensor dicts, so the exporter does not care how the runtime stores weights:
- base tensors by Hugging Face checkpoint name (`model.layers.0.self_attn.q_proj.weight`, ...);
- LoRA tensors as `<hf module>.lora_A.weight` (shape r x in) and `<hf module>.lora_B.weight` (out x r);
- the model's `config.json` as a dict, and the source model folder (tokenizer, generation config).
Every output folder is written into a temp folder and renamed into place (never half-written).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from surogate.errors import UserError
from surogate.runtime.atomic_files import atomic_directory, owned_host_tensors

PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Files a Hugging Face model folder carries besides weights and config.json.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json", "generation_config.json",
)
_TORCH_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def lora_modules(lora: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """`{module: (A, B)}` from `<module>.lora_A.weight` / `<module>.lora_B.weight`; checks pairs and shapes."""
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key in lora:
        if not key.endswith((".lora_A.weight", ".lora_B.weight")):
            raise ValueError(f"unexpected LoRA tensor name {key!r} (want <module>.lora_A.weight / .lora_B.weight)")
    for key in sorted(k for k in lora if k.endswith(".lora_A.weight")):
        module = key[: -len(".lora_A.weight")]
        b_key = f"{module}.lora_B.weight"
        if b_key not in lora:
            raise ValueError(f"LoRA module {module!r} has lora_A but no lora_B")
        a, b = lora[key], lora[b_key]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(f"LoRA module {module!r}: A {tuple(a.shape)} and B {tuple(b.shape)} do not form B @ A")
        out[module] = (a, b)
    orphans = sorted(k for k in lora if k.endswith(".lora_B.weight") and k[: -len(".lora_B.weight")] not in out)
    if orphans:
        raise ValueError(f"LoRA module {orphans[0][: -len('.lora_B.weight')]!r} has lora_B but no lora_A")
    return out


def _target_modules(modules: Iterable[str], base_names: Iterable[str] | None) -> list[str]:
    """Short names (`q_proj`) when LoRA covers every such module of the base; exact names otherwise.

    PEFT matches a target by full name or by `.`-suffix, so a short name on a partly covered model
    would create (zero) adapters where none were trained.
    """
    modules = sorted(modules)
    short = sorted({m.rsplit(".", 1)[-1] for m in modules})
    if base_names is None:
        return short
    linear = {n[: -len(".weight")] for n in base_names if n.endswith(".weight")}
    covered = {m for m in linear if m.rsplit(".", 1)[-1] in short}
    return short if covered == set(modules) else modules


def export_peft_adapter(
    out_dir: str | os.PathLike,
    lora: Mapping[str, torch.Tensor],
    *,
    lora_alpha: float,
    lora_dropout: float = 0.0,
    base_model_name_or_path: str | None = None,
    base_names: Iterable[str] | None = None,
    modules_to_save: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write a PEFT LoRA adapter folder (`adapter_config.json` + `adapter_model.safetensors`).

    `base_names`: the base model's tensor names, used to decide whether `target_modules` can use short names.
    `modules_to_save`: weights trained in full beside the adapters (e.g. the MoE router with
    `train_router`), by HF name; PEFT stores them whole and lists their module names in `modules_to_save`.
    """
    modules = lora_modules(lora)
    if not modules:
        raise UserError(f"{out_dir}: no LoRA tensors to export (was LoRA enabled?)")
    ranks = {a.shape[0] for a, _ in modules.values()}
    if len(ranks) != 1:
        raise ValueError(f"LoRA modules have different ranks {sorted(ranks)}; PEFT export needs one `r`")
    r = ranks.pop()
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": int(r),
        "lora_alpha": lora_alpha,
        "lora_dropout": float(lora_dropout),
        "target_modules": _target_modules(modules, base_names),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": sorted({k.removesuffix(".weight").removesuffix(".bias").rsplit(".", 1)[-1]
                                   for k in modules_to_save}) if modules_to_save else None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    tensors = {}
    for module, (a, b) in modules.items():
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = a
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b
    for name, value in (modules_to_save or {}).items():  # PEFT saves them without its wrapper's prefix
        tensors[f"{PEFT_PREFIX}{name}"] = value
    with atomic_directory(out_dir) as tmp:
        save_file(owned_host_tensors(tensors), str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return Path(out_dir)


def merge_lora(
    base: Mapping[str, torch.Tensor], lora: Mapping[str, torch.Tensor], *, lora_alpha: float,
    use_rslora: bool = False,
) -> dict[str, torch.Tensor]:
    """Base tensors with `W + s * B @ A` folded in, `s = lora_alpha / r` (`/ sqrt(r)` with rsLoRA);
    computed in fp32, stored in W's dtype."""
    merged = dict(base)
    for module, (a, b) in lora_modules(lora).items():
        key = f"{module}.weight"
        if key not in base:
            raise ValueError(f"LoRA module {module!r} has no base weight {key!r}")
        w = base[key]
        r = a.shape[0]
        delta = (b.float() @ a.float()) * (lora_alpha / (r**0.5 if use_rslora else r))
        if delta.shape != w.shape:
            raise ValueError(f"LoRA delta for {key!r} has shape {tuple(delta.shape)}, weight has {tuple(w.shape)}")
        merged[key] = (w.float() + delta).to(w.dtype)
    return merged


def _drop_tied_head(tensors: dict[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """With tied embeddings HF checkpoints omit `lm_head.weight` (it is the embedding)."""
    embed = next((k for k in tensors if k.endswith("embed_tokens.weight")), None)
    if not config.get("tie_word_embeddings", False):
        if "lm_head.weight" not in tensors:
            raise UserError("export: the model has untied embeddings but no `lm_head.weight` tensor was given")
        return tensors
    if "lm_head.weight" in tensors:
        head = tensors.pop("lm_head.weight")
        if embed is not None and head is not tensors[embed] and not torch.equal(head, tensors[embed]):
            raise UserError("export: `tie_word_embeddings` is true but lm_head.weight differs from the embedding")
    return tensors


def _shards(tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


def _write_weights(out: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> None:
    shards = _shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(shard, fname)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def _updated_config(config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The source config with its dtype set to what the weights are actually stored in."""
    cfg = json.loads(json.dumps(dict(config)))
    dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
    if len(dtypes) == 1 and (name := _TORCH_DTYPE_NAMES.get(dtypes.pop())):
        key = "torch_dtype" if "torch_dtype" in cfg and "dtype" not in cfg else "dtype"
        cfg[key] = name
    cfg.pop("quantization_config", None)  # exported weights are plain tensors
    return cfg


def _generation_config(config: Mapping[str, Any]) -> dict[str, Any]:
    gen = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config.get(k) is not None}
    return {"_from_model_config": True, **gen}


def export_hf_model(
    out_dir: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    source_dir: str | os.PathLike | None = None,
    *,
    max_shard_bytes: int = 5 * 1024**3,
    tokenizer: Any = None,
    chat_template: str | None = None,
) -> Path:
    """Write a Hugging Face model folder: safetensors (sharded above `max_shard_bytes`, with index),
    `config.json`, and the tokenizer / generation-config files of `source_dir` (a generation config is
    derived from `config` when the source has none). Without a `source_dir`, `tokenizer` writes its own
    files; `chat_template` (the one the run trained with) replaces the tokenizer's. All inside the folder's
    atomic write."""
    weights = _drop_tied_head(owned_host_tensors(dict(tensors)), config)
    source = Path(source_dir) if source_dir is not None else None
    if source is not None and not source.is_dir():
        raise UserError(f"export: source model folder {source} does not exist (needed for tokenizer files)")
    with atomic_directory(out_dir) as tmp:
        _write_weights(tmp, weights, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(_updated_config(config, weights), indent=2) + "\n",
                                         encoding="utf-8")
        for name in TOKENIZER_FILES:
            if source is not None and (source / name).is_file():
                shutil.copy2(source / name, tmp / name)
        if source is None and tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if chat_template is not None:
            _write_chat_template(tmp, chat_template)
        if not (tmp / "generation_config.json").exists():
            (tmp / "generation_config.json").write_text(json.dumps(_generation_config(config), indent=2) + "\n",
                                                        encoding="utf-8")
    return Path(out_dir)


def _write_chat_template(folder: str | os.PathLike, source: str) -> None:
    """Make `source` the chat template of an exported model folder: `chat_template.jinja` (what transformers
    loads and saves), with any other copy of a template (tokenizer_config.json's `chat_template`, a legacy
    chat_template.json) removed so that no loader picks the source model's instead."""
    folder = Path(folder)
    (folder / "chat_template.jinja").write_text(source, encoding="utf-8")
    (folder / "chat_template.json").unlink(missing_ok=True)
    config = folder / "tokenizer_config.json"
    if config.is_file():
        data = json.loads(config.read_text(encoding="utf-8"))
        if "chat_template" in data:
            del data["chat_template"]
            config.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def export_merged_model(
    out_dir: str | os.PathLike,
    base: Mapping[str, torch.Tensor],
    lora: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    source_dir: str | os.PathLike | None = None,
    *,
    lora_alpha: float,
    **folder: Any,
) -> Path:
    """Merge LoRA into the base weights and write the result as a Hugging Face model folder (`folder`:
    `export_hf_model`'s keyword options)."""
    return export_hf_model(out_dir, merge_lora(base, lora, lora_alpha=lora_alpha), config, source_dir, **folder)


def read_model_config(model_dir: str | os.PathLike) -> dict[str, Any]:
    """A model folder's `config.json` as a dict (UserError naming the file if missing or malformed)."""
    path = Path(model_dir) / "config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise UserError(f"{path}: not found; cannot export without the model's config") from exc
    except ValueError as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from exc


def export_for_config(
    cfg: Any,
    weights: Mapping[str, torch.Tensor],
    lora: Mapping[str, torch.Tensor] | None,
    source_dir: str | os.PathLike,
) -> dict[str, Path]:
    """The end-of-training outputs a config asks for, under `output_dir`:

    - `lora: true`  -> `adapter/` (PEFT), plus `merged/` (full HF model) when `merge_adapter: true`;
    - `lora: false` -> `model/` (full HF model).
    `weights`: by HF name, the trained weights (full fine-tuning) or the dequantized base (LoRA);
    `source_dir`: the local model folder (its config.json and tokenizer are carried over).
    """
    out = Path(cfg.output_dir)
    config = read_model_config(source_dir)
    written: dict[str, Path] = {}
    if cfg.lora:
        if not lora:
            raise UserError("export: `lora: true` but the run produced no LoRA tensors")
        written["adapter"] = export_peft_adapter(out / "adapter", lora, lora_alpha=cfg.lora_alpha,
                                                 lora_dropout=cfg.lora_dropout, base_model_name_or_path=cfg.model,
                                                 base_names=weights)
        if cfg.merge_adapter:
            written["merged"] = export_merged_model(out / "merged", weights, lora, config, source_dir,
                                                    lora_alpha=cfg.lora_alpha)
    else:
        written["model"] = export_hf_model(out / "model", weights, config, source_dir)
    return written
