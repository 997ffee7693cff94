"""What a checkpoint was trained on, beyond its config: the tokenized data and the frozen model weights.

The config fingerprint (checkpoint_config.py) compares options, and a dataset or model is named there by its path:
a data file edited in place (a row appended or changed, rows reordered), or a model folder whose weights were
replaced (another revision), kept its path, and a resume silently continued the saved data position in other data,
or trained the saved adapter on another base model. Every checkpoint therefore records

- `data`: per split (train, eval), its packed row and token counts and a sha256 over its token arrays (every byte:
  a changed row changes it; hashed when the tokenized cache entry is written, and kept in its split.json, so a
  run reading the cache does not read every token again: `TokenizedSplit.content_sha256`);
- `model`: when the plan has frozen weights loaded from files (LoRA / QLoRA, and `adapter_path` merged into them),
  each weight file's name, size and a sha256 over its safetensors header and a few evenly spaced 64 KiB pieces
  of its data (another model's weights differ throughout; reading a whole large model at every start would not).

- `model_config`: the model's config.json (its architecture and numbers such as rope_theta, also for full fine-tunes).

A resume whose identity differs is refused (ConfigMismatchError) naming what changed; checkpoints written before
this record are resumed as before. The same record lets a resume whose model, adapter or dataset paths changed go
on when the content is the same (`check_moved`): a project moved, or a cluster mounting the files elsewhere.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from surogate.runtime.checkpoint_config import ConfigMismatchError

KEY = "identity"  # the checkpoint state's field
_PIECES = 8  # sampled pieces of a weight file's data
_PIECE = 1 << 16


def split_identity(split: Any) -> dict[str, Any] | None:
    """Rows, tokens and a sha256 over the arrays (and layout) of a tokenized split; None for no split."""
    if split is None:
        return None
    return {"rows": int(split.num_rows), "tokens": int(split.num_tokens), "sha256": split.content_sha256()}


def data_identity(data: Any) -> dict[str, Any]:
    return {"train": split_identity(data.train), "eval": split_identity(data.eval)}


def file_identity(path: Path) -> dict[str, Any]:
    """Size and a sha256 over a file's safetensors header (or whole text, for a small file) and sampled pieces."""
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if path.suffix != ".safetensors" or size <= _PIECES * _PIECE:
            h.update(f.read())
            return {"size": size, "sha256": h.hexdigest()}
        header = int.from_bytes(f.read(8), "little")
        h.update(f.read(min(header, size - 8)))
        for k in range(_PIECES):
            f.seek(min(size - _PIECE, 8 + header + k * max(0, size - 8 - header - _PIECE) // (_PIECES - 1)))
            h.update(f.read(_PIECE))
    return {"size": size, "sha256": h.hexdigest()}


def model_identity(plan: Any, cfg: Any, source_dir: Path | None) -> dict[str, Any] | None:
    """The identity of the frozen weights' files (model folder, `adapter_path`), or None when the run trains every
    weight it has (full fine-tuning: the checkpoint holds them all) or starts from random weights."""
    from surogate.compiler.ir import Role
    from surogate.compiler.models.resolve import weight_files

    frozen = any(t.role is Role.FROZEN_WEIGHT for t in plan.tensors.values())
    if not frozen or source_dir is None or getattr(cfg, "from_scratch", False):
        return None
    folder = Path(source_dir)
    found = {f"model/{name}": file_identity(folder / name) for name in weight_files(folder) or ()
             if (folder / name).is_file()}
    if getattr(cfg, "adapter_path", None):
        adapter = Path(cfg.adapter_path)
        found |= {f"adapter_path/{p.name}": file_identity(p) for p in sorted(adapter.iterdir())
                  if p.is_file() and p.name in ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")}
    return found or None


def config_identity(source_dir: Path | None) -> dict[str, Any] | None:
    """The model's config.json (architecture and numbers such as rope_theta or rms_norm_eps), when it has one."""
    path = Path(source_dir) / "config.json" if source_dir is not None else None
    return file_identity(path) if path is not None and path.is_file() else None


def run_identity(data: Any, plan: Any, cfg: Any, source_dir: Path | None) -> dict[str, Any]:
    return {"data": data_identity(data), "model": model_identity(plan, cfg, source_dir),
            "model_config": config_identity(source_dir)}


def check_moved(saved: Any, current: dict[str, Any], moved: list[str], where: Path) -> str:
    """The note of a resume whose model, adapter or dataset paths changed (`moved`: `name: old -> new`) after
    `check_same_identity` found the content the same (what both records hold agrees); ConfigMismatchError when the
    checkpoint's record cannot prove it (written before the record had the model's config.json, or holding no
    record of a part that moved)."""
    listed = "; ".join(moved)
    record = saved if isinstance(saved, dict) else {}
    missing = [what for what, ok in (
        ("data", isinstance(record.get("data"), dict)),
        ("model config.json", record.get("model_config") is not None),  # (equal to this run's: check_same_identity)
        ("base weights", current.get("model") is None or record.get("model") is not None),
    ) if not ok]
    if missing:
        raise ConfigMismatchError(
            f"checkpoint {where} was written with other file paths ({listed}) and holds no record of the "
            f"{', '.join(missing)} it was trained with to show the files merely moved; to resume it, put those "
            "options back")
    return (f"resume: {listed}: moved; the same content as {where.name} was trained on (tokenized data"
            f"{', base weights' if current.get('model') else ''} and the model's config.json compared)")


def _split_words(ident: dict[str, Any] | None) -> str:
    return "none" if not ident else f"{ident['rows']:,} packed rows, {ident['tokens']:,} tokens"


def check_same_identity(saved: Any, current: dict[str, Any], where: Path) -> None:
    """ConfigMismatchError naming what differs between a checkpoint's identity and this run's (nothing is checked
    when the checkpoint has none, or a part of it)."""
    if not isinstance(saved, dict):
        return
    problems: list[str] = []
    back: list[str] = []  # what to put back
    old_data, new_data = saved.get("data"), current.get("data") or {}
    if isinstance(old_data, dict):
        for part, what in (("train", "training"), ("eval", "evaluation")):
            if part in old_data and old_data[part] != new_data.get(part):
                problems.append(f"the {what} data differs from the one it was trained with (it had "
                                f"{_split_words(old_data[part])}; now {_split_words(new_data.get(part))})")
    if problems:
        back.append("data")
        problems[-1] += (": a dataset file changed since (a row added, removed, changed or moved), or the tokenizer "
                         "or chat template did, and the saved data position would continue in other data")
    if "model_config" in saved and saved["model_config"] != current.get("model_config"):
        problems.append("the model's config.json differs from the one it was trained with (architecture or numbers "
                        "such as rope_theta or rms_norm_eps)")
        back.append("model")
    old_model, new_model = saved.get("model"), current.get("model")
    if isinstance(old_model, dict) and old_model != (new_model or {}):
        changed = sorted(k for k in set(old_model) | set(new_model or {}) if old_model.get(k) != (new_model or {}).get(k))
        problems.append(f"the frozen base weights' files differ from the ones it was trained on ({', '.join(changed)}"
                        f"): the model folder (or adapter_path) holds other weights now, under which its adapter "
                        "would go on training")
        back.append("model weights")
    if problems:
        raise ConfigMismatchError(f"checkpoint {where} cannot be resumed: " + "; ".join(problems)
                                  + f". To resume it, put back the {' and '.join(back)} it was trained with")
