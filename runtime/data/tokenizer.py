"""Loading the run's tokenizer from `cfg.model`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from surogate.errors import UserError


def load_tokenizer(cfg: Any) -> Any:
    """`AutoTokenizer` of `cfg.model` (a local folder, or a hub id in the local cache / reachable hub).

    A tokenizer without a pad token gets its EOS token as pad token (batches need a pad id).
    """
    from transformers import AutoTokenizer

    model = getattr(cfg, "model", None)
    if not model:
        raise UserError("model: required (a model folder or hub id) to load the tokenizer")
    local = Path(str(model)).expanduser()
    if str(model).startswith(("/", "./", "../", "~")) and not local.exists():
        raise UserError(f"model: folder {model!r} does not exist")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(local) if local.exists() else str(model))
    except Exception as exc:  # transformers raises OSError/ValueError/... for missing or broken tokenizers
        # the whole reason on one line: transformers' config validation puts it after a headline
        reason = " ".join(line.strip() for line in str(exc).strip().splitlines() if line.strip())
        raise UserError(f"model: could not load a tokenizer from {model!r}: {type(exc).__name__}: "
                        f"{reason[:600]}") from None
    _check_not_empty(tokenizer, model, local)
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(f"model: the tokenizer of {model!r} is not a fast (Rust) tokenizer; the data pipeline "
                        "needs token offsets, which only fast tokenizers provide")
    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


def _check_not_empty(tokenizer: Any, model: Any, local: Path) -> None:
    """`UserError` when the tokenizer tokenizes text to nothing. transformers quietly builds an empty
    tokenizer for a folder without tokenizer files; every row would then render to zero tokens and the
    error would blame the dataset instead of the model folder."""
    if tokenizer("hello world", add_special_tokens=False)["input_ids"]:
        return
    where = f"{str(local)!r}" if local.is_dir() else repr(str(model))
    found = [name for name in _TOKENIZER_FILES if (local / name).is_file()] if local.is_dir() else []
    detail = (f"it has {', '.join(found)} but an empty vocabulary" if found else
              f"none of {', '.join(_TOKENIZER_FILES)} is there")
    raise UserError(f"model: no tokenizer in {where} ({detail}: text tokenizes to nothing); point model at a "
                    "folder with the model's tokenizer files")


def pad_token_id(tokenizer: Any) -> int:
    """The id used for padding: pad token, else EOS, else 0."""
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0
