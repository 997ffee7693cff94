"""The tokenized cache: where it lives, its key, and atomic write / read.

Layout: `<root>/tokenized/<key>/{train/, eval/, stats.json, key.json, files.json}` where root is
`distributed.worker_output_dir/node-{rank}` when set (see `cache_root`), else `output_dir`. The key hashes everything the
tokens depend on (see `cache_key`). A cache entry is written into a temporary sibling folder and renamed
into place, so a reader never sees a half-written entry; if two processes race, the first rename wins
and the loser's copy is discarded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from surogate.errors import UserError

# Bump when the tokenized output of the same inputs changes (format or semantics).
CACHE_VERSION = 11  # 2: response_prefix added to responses that lack it; 3: JSON files read exactly ("48" stays a
# string); 4: long text samples truncated (were deleted), exact split names pick their files; 5: stats hold
# max_token_id; 6: files.json holds the size and mtime of the splits' files (an edited entry is rebuilt); 7: CSV
# cells read as the text written ("007" was 7.0, "null" / empty cells null); 8: prompt_format's {{ and }} are
# literal braces (str.format), as validate reads them; 9: a message without a content key, a tool call that is not
# an object naming its function are bad rows (entries that trained them as empty text are not reused); 10: system and
# response_prefix shape prompt_format samples (were ignored); 11: a role.<value> key of message_property_mappings is
# trimmed like the role values it matches ("role. Human " maps "human"; it matched nothing)


def cache_root(cfg: Any, rank: int = 0) -> Path:
    """The folder holding tokenized caches for this config and node rank.

    `distributed.worker_output_dir/node-{rank}` when set; else, for multi-node runs, node-local
    `/tmp/surogate-{run_name}/node-{rank}` (the reference's default); else `output_dir`.
    """
    dist = getattr(cfg, "distributed", None)
    worker_dir = getattr(dist, "worker_output_dir", None) if dist is not None else None
    if not worker_dir and int(getattr(dist, "num_nodes", 1) or 1) > 1:
        worker_dir = f"/tmp/surogate-{getattr(cfg, 'run_name', None) or 'run'}"
    if worker_dir:
        return Path(worker_dir).expanduser() / f"node-{rank}" / "tokenized"
    return Path(getattr(cfg, "output_dir", None) or "output").expanduser() / "tokenized"


def cache_root_origin(cfg: Any) -> str:
    """The config field that chose `cache_root` (for errors about that folder)."""
    dist = getattr(cfg, "distributed", None)
    if dist is not None and getattr(dist, "worker_output_dir", None):
        return "distributed.worker_output_dir"
    if int(getattr(dist, "num_nodes", 1) or 1) > 1:
        return "distributed.num_nodes (multi-node runs cache under /tmp/surogate-<run_name>; set " \
            "distributed.worker_output_dir)"
    return "output_dir"


def ensure_cache_root(cfg: Any, rank: int = 0) -> Path:
    """`cache_root`, created and writable; `UserError` naming the folder and its config field otherwise
    (output_dir an existing file, a read-only or impossible place such as /proc/x)."""
    root = cache_root(cfg, rank)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        reason = "a file is in the way" if isinstance(exc, (FileExistsError, NotADirectoryError)) else exc.strerror
        raise UserError(f"{cache_root_origin(cfg)}: cannot create the tokenized-data folder {root} ({reason})") \
            from None
    if not os.access(root, os.W_OK | os.X_OK):
        raise UserError(f"{cache_root_origin(cfg)}: the tokenized-data folder {root} is not writable")
    return root


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of the tokenizer's vocabulary/merges/normalizers, special tokens and chat template."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps({k: str(v) for k, v in tokenizer.special_tokens_map.items()}, sort_keys=True).encode())
    h.update(str(getattr(tokenizer, "chat_template", None)).encode())
    h.update(type(tokenizer).__name__.encode())
    return h.hexdigest()


def cache_key(parts: dict[str, Any]) -> str:
    """A short stable hash of `parts` (JSON-serialisable)."""
    blob = json.dumps({"version": CACHE_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def entry_ready(folder: Path) -> bool:
    return (folder / "stats.json").is_file()


def write_atomic(folder: Path, write: Any) -> Path:
    """Call `write(tmp_folder)` then rename tmp_folder to `folder`; returns `folder`."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        write(tmp)
        try:
            os.rename(tmp, folder)
        except OSError:
            if not entry_ready(folder):  # not a lost race: a real failure
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
