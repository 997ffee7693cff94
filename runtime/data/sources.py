"""Where rows come from: local files and folders, fsspec URLs (s3://, gs://, ...) and Hugging Face hub ids.

Local files and URLs: .json/.jsonl and .txt (one row per line, column `text`) are read exactly by
`linefiles.py` (the `datasets` JSON builder decodes strings of mixed-type columns: "48" -> 48); .parquet,
.csv and .arrow by the matching `datasets` builder (`tables.py`; CSV cells as the text written). JSON, JSON
Lines, CSV and text files may be compressed (.gz, .bz2, .xz; see `filekinds.py`). A folder holds files of one kind
(searched recursively) or is a `Dataset.save_to_disk` folder. When a folder's file names mark splits
(`train.jsonl`, `test-00000.parquet`, `data/validation/...`), `split` picks those files: the ones naming it
exactly (`train_sft` -> `train_sft-0000.parquet`, not `train_gen-...`), else the ones of its kind (`val` ->
`validation.jsonl`); otherwise every file is used. Anything else is a hub id, loaded with `subset` and `split`
(from the local cache when offline). `subset` applies to hub ids only, `split` to nothing in a single file or a
folder without split names: each such case is a note in the run's start summary (`Source.notes`), not a silence.
A path with glob characters (`data/*.jsonl`, `**/*.parquet`) reads every data file it matches.
`samples` keeps the first N rows. Each source has a fingerprint for the tokenized cache: path, size and
mtime of every local file; size and ETag/mtime of every remote file; the `datasets` fingerprint of a hub
dataset (which is derived from its cached files).
"""

from __future__ import annotations

import glob
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from surogate.errors import UserError

from .filekinds import SUPPORTED, builder_of, file_type


@dataclass(frozen=True)
class Source:
    """A resolved dataset location. kind: local (files), url (fsspec files), disk (save_to_disk), hub."""

    index: int
    path: str
    kind: str
    files: tuple[str, ...] = ()
    builder: str | None = None
    subset: str | None = None
    split: str = "train"
    samples: int | None = None
    section: str = "datasets"
    notes: tuple[str, ...] = ()  # options of this dataset that had no effect on this kind of source

    @property
    def where(self) -> str:
        return f"{self.section}[{self.index}].path"


def _builder_for(files: list[str], where: str, path: str) -> str:
    kinds = {builder_of(f) for f in files}
    if len(kinds) > 1:
        raise UserError(f"{where}: {path!r} mixes file kinds ({', '.join(sorted(kinds))}); use one kind per dataset")
    return kinds.pop()


def _supported(name: str) -> bool:
    return builder_of(name) is not None


# File-name words that mark a split inside a dataset folder (the Hugging Face naming convention).
_SPLIT_WORDS = {"train": ("train", "training"), "validation": ("validation", "valid", "val", "dev", "eval"),
                "test": ("test", "testing")}


def _split_of(relative: str) -> str | None:
    words = set(re.split(r"[^a-z0-9]+", relative.lower()))
    return next((split for split, names in _SPLIT_WORDS.items() if words & set(names)), None)


def _names_split(relative: str, split: str) -> bool:
    """The path names `split` as a whole word (underscores kept: `train_sft` is not `train`)."""
    return split.lower() in re.split(r"[^a-z0-9_]+", relative.lower())


def _select_split(files: list[str], root: str, split: str, where: str, path: str) -> tuple[list[str], str | None]:
    """(files of `split`, note) when the folder's file names mark splits (train.jsonl, test-0001.parquet, ...):
    those naming `split` exactly, else those of its kind. Otherwise every file, and a note unless `split` is
    the default."""
    exact = [f for f in files if _names_split(f[len(root):], split)]
    if exact:
        return exact, None
    marked = {f: _split_of(f[len(root):]) for f in files}
    if not any(marked.values()):
        return files, _unused_split(where, split, f"the file names in {path!r} mark no splits (every file is read)")
    wanted = _split_of(split) or split
    chosen = [f for f in files if marked[f] == wanted]
    if not chosen:
        found = ", ".join(sorted({m for m in marked.values() if m}))
        raise UserError(f"{where.rsplit('.', 1)[0]}.split: no {split!r} files in {path!r} (its files mark the "
                        f"splits {found})")
    return chosen, None


def _unused_split(where: str, split: str, why: str) -> str | None:
    """The note for a `split` that selects nothing (none for the default, `train`)."""
    return None if split == "train" else f"{where.rsplit('.', 1)[0]}.split: {split!r} has no effect: {why}"


SINGLE_FILE = "a single file has no splits (every row is read)"


def _unused_options(common: dict, where: str, split_note: str | None) -> tuple[str, ...]:
    """Notes for the options that do nothing on a source that is not a hub id (which uses both)."""
    notes = [split_note] if split_note else []
    if common["subset"] is not None:
        notes.append(f"{where.rsplit('.', 1)[0]}.subset: {common['subset']!r} has no effect: subsets are "
                     "configurations of Hugging Face hub datasets, and this path is not one")
    return tuple(notes)


def _looks_local(path: str) -> bool:
    return path.startswith(("/", "./", "../", "~")) or _supported(path)


def resolve_source(ds_cfg: Any, index: int, section: str = "datasets") -> Source:
    """Classify a dataset's `path` and list its files; `UserError` for a missing or unusable path."""
    path = getattr(ds_cfg, "path", None)
    where = f"{section}[{index}].path"
    if not path:
        raise UserError(f"{where}: required")
    common = {"index": index, "path": path, "subset": getattr(ds_cfg, "subset", None),
              "split": getattr(ds_cfg, "split", None) or "train", "samples": getattr(ds_cfg, "samples", None),
              "section": section}
    if "://" in path:
        return _resolve_url(path, where, common)
    local = Path(path).expanduser()
    if local.is_file():
        if not _supported(local.name):
            raise UserError(f"{where}: unsupported file type {file_type(local.name)!r}; use one of {SUPPORTED}")
        notes = _unused_options(common, where, _unused_split(where, common["split"], SINGLE_FILE))
        return Source(kind="local", files=(str(local.resolve()),), builder=_builder_for([local.name], where, path),
                      notes=notes, **common)
    if local.is_dir():
        if (local / "state.json").is_file() and (local / "dataset_info.json").is_file():
            notes = _unused_options(common, where, _unused_split(where, common["split"], "a saved Dataset (not a "
                                                                 "DatasetDict) has no splits"))
            return Source(kind="disk", files=(str(local.resolve()),), notes=notes, **common)
        if (local / "dataset_dict.json").is_file():  # a saved DatasetDict: `split` picks one (see load_source)
            return Source(kind="disk", files=(str(local.resolve()),), notes=_unused_options(common, where, None),
                          **common)
        files = sorted(str(p.resolve()) for p in local.rglob("*") if p.is_file() and _supported(p.name))
        if not files:
            raise UserError(f"{where}: folder {path!r} has no data files ({SUPPORTED})")
        files, split_note = _select_split(files, str(local.resolve()), common["split"], where, path)
        return Source(kind="local", files=tuple(files), builder=_builder_for(files, where, path),
                      notes=_unused_options(common, where, split_note), **common)
    if local.exists():  # /dev/null, a socket, ...: rows are read from files and folders only
        raise UserError(f"{where}: {path!r} is not a regular file or a folder")
    if glob.has_magic(path):  # never a hub id: those have no * ? [
        return _resolve_glob(path, where, common)
    if _looks_local(path):
        raise UserError(f"{where}: file or folder {path!r} does not exist")
    return Source(kind="hub", **common)


def _resolve_glob(pattern: str, where: str, common: dict) -> Source:
    """A glob pattern (`data/*.jsonl`, `shards/**/*.parquet`): every data file it matches, sorted, one kind."""
    matched = sorted({str(Path(p).resolve()) for p in glob.glob(os.path.expanduser(pattern), recursive=True)})
    files = [p for p in matched if os.path.isfile(p) and _supported(p)]
    if not files:
        found = f" (it matches {len(matched)} path(s), none a data file)" if matched else ""
        raise UserError(f"{where}: the pattern {pattern!r} matches no data files ({SUPPORTED}){found}")
    split_note = _unused_split(where, common["split"], "a glob pattern's files are all read")
    return Source(kind="local", files=tuple(files), builder=_builder_for(files, where, pattern),
                  notes=_unused_options(common, where, split_note), **common)


def _resolve_url(url: str, where: str, common: dict) -> Source:
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(url)
        split_note = None
        if fs.isdir(root):
            found = sorted(p for p in fs.find(root) if _supported(p))
            if found:
                found, split_note = _select_split(found, root, common["split"], where, url)
            protocol = url.split("://", 1)[0]
            files = [f"{protocol}://{p.lstrip('/')}" if protocol != "file" else f"file://{p}" for p in found]
        elif fs.exists(root):
            files = [url]
            split_note = _unused_split(where, common["split"], SINGLE_FILE)
        else:
            raise UserError(f"{where}: {url!r} does not exist")
    except UserError:
        raise
    except (ImportError, ValueError) as exc:
        raise UserError(f"{where}: cannot open {url!r}: {exc} (is the fsspec backend, e.g. s3fs/gcsfs, "
                        "installed?)") from None
    except Exception as exc:  # network / credentials errors of any fsspec backend
        raise UserError(f"{where}: cannot open {url!r}: {type(exc).__name__}: {exc}") from None
    if not files:
        raise UserError(f"{where}: {url!r} has no data files ({SUPPORTED})")
    for f in files:
        if not _supported(f):
            raise UserError(f"{where}: unsupported file type in {f!r}; use one of {SUPPORTED}")
    return Source(kind="url", files=tuple(files), builder=_builder_for(files, where, url),
                  notes=_unused_options(common, where, split_note), **common)


def file_fingerprint(source: Source) -> list:
    """Identity of the source's files for the cache key (hub sources: see `dataset_fingerprint`)."""
    if source.kind in ("local", "disk"):
        paths = source.files
        if source.kind == "disk":
            paths = tuple(str(p) for p in sorted(Path(source.files[0]).rglob("*")) if p.is_file())
        return [(p, os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in paths]
    if source.kind == "url":
        import fsspec

        out = []
        for url in source.files:
            fs, p = fsspec.core.url_to_fs(url)
            info = fs.info(p)
            keys = ("size", "ETag", "etag", "md5", "mtime", "LastModified", "updated", "created")
            out.append((url, json.dumps({k: str(info[k]) for k in keys if k in info}, sort_keys=True)))
        return out
    return []


def load_source(source: Source, on_bad_row: str = "error"):
    """Load the rows of `source` (first `samples` rows); `UserError` naming the file, line and reason.

    JSON, JSON Lines and text files (local or URL) are read exactly by `linefiles.scan_files` (a
    `FileRows`); unreadable lines are errors, or rows the encoder skips when `on_bad_row` is "skip".
    Everything else is a `datasets.Dataset`.
    """
    if source.kind in ("local", "url") and source.builder in ("json", "text"):
        return _load_line_files(source, on_bad_row)
    from .tables import load_table

    return load_table(source)


def _load_line_files(source: Source, on_bad_row: str):
    from .linefiles import LoadError, scan_files

    limit = int(source.samples) if source.samples is not None else None
    try:
        return scan_files(list(source.files), source.builder, on_bad_row, limit)
    except LoadError as exc:
        raise UserError(f"{source.where}: could not load {source.path!r}: {exc}") from None


def dataset_fingerprint(source: Source, ds) -> list:
    """Cache-key identity of a loaded source: its files, plus the `datasets` fingerprint for hub ids."""
    ident = file_fingerprint(source)
    if source.kind == "hub":
        ident.append(getattr(ds, "_fingerprint", None))
    return ident
