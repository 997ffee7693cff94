"""`prepare_datasets`: sources -> rows -> documents -> packed splits, through the tokenized cache.

Order of work: resolve every source (and load hub datasets, whose fingerprint the key needs), hash
everything the tokens depend on, and reuse the cache entry with that key if it exists. Otherwise load the
file sources, resolve each dataset's type, split train/eval, encode rows in chunks (in worker processes
when `dataloader_num_workers` > 0), truncate, pack, and write the cache entry atomically.

Eval split: `validation_datasets` when given; else a `validation_split_ratio` share of all training rows
(at least one, never all), chosen by a permutation seeded with `eval_seed`, before tokenization (so the
pieces of one split row never land on both sides). Row order inside each split is the dataset order;
`TokenizedSplit.batches` shuffles rows per epoch with `train_seed` / `eval_seed`.

Rows of `sequence_len` tokens: `sample_packing` packs documents by best-fit decreasing; otherwise
`padding_free` concatenates them in dataset order (a new row when the next one does not fit); otherwise
each document is its own row, padded. `max_length` (default `sequence_len`) bounds every document.

Bad rows raise `DataError` (dataset, row, field) by default, also from worker processes;
`on_bad_row="skip"` (CLI: `surogate tokenize --skip-bad-rows`) counts and reports them instead.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from surogate.errors import UserError

from .agent import AGENT_TEMPLATES
from .cache import (
    cache_key,
    cache_root,
    cache_root_origin,
    ensure_cache_root,
    entry_ready,
    tokenizer_fingerprint,
    write_atomic,
)
from .encode import Encoder, EncodeResult
from .errors import BadRow
from .formats import DatasetSpec, resolve_spec
from .linefiles import FileRows
from .options import DataOptions, data_options
from .packing import one_per_row, pack_best_fit_decreasing, pack_sequential
from .sources import Source, dataset_fingerprint, load_source, resolve_source
from .split import TokenizedSplit
from .stats import DataStats, SplitStats
from .templates import ChatTemplate, resolve_template
from .tokenizer import pad_token_id

logger = logging.getLogger("surogate.data")

_DATASET_OPTIONS = ("path", "type", "subset", "split", "samples", "text_field", "instruction_field",
                    "output_field", "input_field", "system_prompt_type", "system_prompt_field", "system_prompt",
                    "prompt_format", "prompt_format_no_input", "messages_field", "system_field", "tools_field",
                    "message_property_mappings")
_MAX_SKIPPED_SHOWN = 20


@dataclass
class PreparedData:
    """The tokenized training split, the eval split (None when there is none) and statistics."""

    train: TokenizedSplit
    eval: TokenizedSplit | None
    stats: DataStats


def _ds_dict(ds_cfg: Any) -> dict[str, Any]:
    return {name: getattr(ds_cfg, name, None) for name in _DATASET_OPTIONS}


def _rows(ds, start: int, stop: int) -> list[dict]:
    """Rows start..stop-1 of a loaded source as dicts (`FileRows` may hold a `BadRow` in skip mode)."""
    if isinstance(ds, FileRows):
        return ds.rows(start, stop)
    columns = ds[start:stop]
    names = list(columns)
    return [dict(zip(names, values, strict=True)) for values in zip(*(columns[n] for n in names), strict=True)]


def _eval_masks(sizes: list[int], ratio: float, seed: int) -> list[np.ndarray]:
    total = sum(sizes)
    chosen = np.zeros(total, dtype=bool)
    if ratio > 0 and total >= 2:
        count = min(total - 1, max(1, round(total * ratio)))
        chosen[np.random.default_rng(seed).permutation(total)[:count]] = True
    bounds = np.cumsum([0, *sizes])
    return [chosen[bounds[i]:bounds[i + 1]] for i in range(len(sizes))]


# ------------------------------------------------------------------------------------------- workers

_WORKER_ENCODER: Encoder | None = None


def _init_worker(encoder: Encoder) -> None:
    global _WORKER_ENCODER
    _WORKER_ENCODER = encoder


def _work(items: list[tuple[int, int, dict]]) -> EncodeResult:
    return _WORKER_ENCODER.encode_rows(items)


Task = tuple[str, list[tuple[int, int, dict]]]  # (split name, [(dataset position, row index, row)])


def _iter_tasks(loaded: list, eval_masks: list[np.ndarray], chunk_size: int) -> Iterator[Task]:
    """Chunks of rows, read lazily so that only the chunks in flight are held in memory."""
    for position, ds in enumerate(loaded):
        is_eval = eval_masks[position]
        for start in range(0, len(ds), chunk_size):
            rows = _rows(ds, start, min(len(ds), start + chunk_size))
            for split_name, flag in (("train", False), ("eval", True)):
                items = [(position, start + j, row) for j, row in enumerate(rows) if is_eval[start + j] == flag]
                if items:
                    yield split_name, items


def _encode_tasks(encoder: Encoder, tasks: Iterator[Task], workers: int) -> Iterator[tuple[str, EncodeResult]]:
    """Encode every task, in `workers` processes when > 0; results in task order, at most 2 tasks per
    worker in flight (bounded memory). A worker's exception (e.g. `DataError`) is re-raised here as is."""
    if workers <= 0:
        for split_name, items in tasks:
            yield split_name, encoder.encode_rows(items)
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # workers parallelise; avoid fork warnings
    # fork: workers inherit the loaded tokenizer and imported modules instead of re-importing torch.
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_init_worker,
                             initargs=(encoder,)) as pool:
        window: deque = deque()
        for split_name, items in tasks:
            window.append((split_name, pool.submit(_work, items)))
            if len(window) >= 2 * workers:
                name, future = window.popleft()
                yield name, future.result()
        while window:
            name, future = window.popleft()
            yield name, future.result()


# ------------------------------------------------------------------------------------------- splits


def _pack(docs: list, opts: DataOptions, pad_id: int) -> TokenizedSplit:
    lengths = np.fromiter((len(t) for t, _ in docs), dtype=np.int64, count=len(docs))
    if opts.sample_packing:
        rows = pack_best_fit_decreasing(lengths, opts.sequence_len)
    elif opts.padding_free:
        rows = pack_sequential(lengths, opts.sequence_len)
    else:
        rows = one_per_row(len(docs))
    return TokenizedSplit.from_docs(docs, rows, opts.sequence_len, pad_id, opts.padding_side)


_FILES = "files.json"  # size and mtime of every file of the entry's splits, as written


def _file_signatures(folder: Path) -> dict[str, list[int]]:
    """{path relative to the entry: [size, mtime_ns]} of the files of its splits (train/, eval/)."""
    out = {}
    for path in sorted(p for split in ("train", "eval") if (folder / split).is_dir() for p in (folder / split).iterdir()):
        st = path.stat()
        out[path.relative_to(folder).as_posix()] = [st.st_size, st.st_mtime_ns]
    return out


def _check_unchanged(folder: Path) -> None:
    """`ValueError` when a split's file was changed after the entry was written: the statistics (the largest
    token id, checked against the model's vocab before training) describe the tokens as written, so an edited
    tokens.npy could hold ids the model has no embedding row for (an IndexError mid-run)."""
    import json

    written = json.loads((folder / _FILES).read_text())
    now = _file_signatures(folder)
    changed = sorted(name for name in written.keys() | now.keys() if written.get(name) != now.get(name))
    if changed:
        raise ValueError(f"{', '.join(changed)} changed since the entry was written")


def _load_entry(folder: Path, started: float) -> PreparedData:
    import json

    _check_unchanged(folder)
    stats = DataStats.from_json(json.loads((folder / "stats.json").read_text()))
    stats.from_cache, stats.rows_tokenized = True, 0
    stats.seconds = time.perf_counter() - started
    train = TokenizedSplit.load(folder / "train")
    evals = TokenizedSplit.load(folder / "eval") if (folder / "eval").is_dir() else None
    return PreparedData(train, evals, stats)


def _load_entry_or_discard(folder: Path, started: float) -> PreparedData | None:
    """The cache entry in `folder`, or None after moving it away when it is broken (truncated or edited
    files): it is then rebuilt, never used and never a crash."""
    import shutil
    import uuid

    try:
        return _load_entry(folder, started)
    except (OSError, ValueError, KeyError, TypeError) as exc:  # np.load / json / split.check on bad files
        logger.warning("tokenized cache entry %s is broken (%s: %s); rebuilding it", folder, type(exc).__name__,
                       exc)
    # Renamed first (atomic), so that a concurrent reader never sees it half-deleted; then removed.
    trash = folder.parent / f".{folder.name}.broken-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(folder, trash)
    except FileNotFoundError:
        return None  # another process discarded it first
    except OSError as exc:
        raise UserError(f"tokenized cache entry {folder} is broken and cannot be removed ({exc.strerror}); "
                        "delete it") from None
    shutil.rmtree(trash, ignore_errors=True)
    return None


def _save_entry(folder: Path, data: PreparedData, key_parts: dict) -> None:
    import json

    def write(tmp: Path) -> None:
        (tmp / "train").mkdir()
        data.train.save(tmp / "train")
        if data.eval is not None:
            (tmp / "eval").mkdir()
            data.eval.save(tmp / "eval")
        (tmp / "key.json").write_text(json.dumps(key_parts, default=str, indent=1))
        (tmp / _FILES).write_text(json.dumps(_file_signatures(tmp), indent=1))
        (tmp / "stats.json").write_text(json.dumps(data.stats.to_json()))  # written last: marks "complete"

    write_atomic(folder, write)


def _unused_options(opts: DataOptions, specs: list[DatasetSpec], chat: bool) -> list[str]:
    """Notes for the chat options that shape nothing this run renders: no dataset is rendered by a chat template
    (`template`, `agent_template`), or every dataset is raw text, trained on every token (also `system`,
    `response_prefix`, `loss_scale`)."""
    why = "no dataset is rendered with a chat template (text data, or instruction data with prompt_format)"
    unused = {"agent_template": opts.agent_template}
    if opts.use_chat_template:  # else validate says so already
        unused["template"] = opts.template
    if all(s.type == "text" for s in specs):
        why = "every dataset is raw text (type: text), trained on every token"
        unused.update(system=opts.system, response_prefix=opts.response_prefix,
                      loss_scale=None if opts.loss_scale == "default" else opts.loss_scale)
    if chat:
        return []
    return [f"{name}: {str(value)[:60]!r} has no effect: {why}" for name, value in unused.items() if value]


def detected_type(ds_cfg: Any, index: int, section: str = "datasets") -> str:
    """What `type: auto` resolves to for one dataset, from its columns and first rows (JSON Lines and text files
    are read no further than those rows); the type itself when it is not `auto`. `UserError` as the run gives."""
    import dataclasses

    if (getattr(ds_cfg, "type", None) or "auto") != "auto":
        return ds_cfg.type
    source = dataclasses.replace(resolve_source(ds_cfg, index, section), samples=5)
    ds = load_source(source)
    head = [r for r in _rows(ds, 0, min(5, len(ds))) if not isinstance(r, BadRow)]
    return resolve_spec(ds_cfg, index, list(ds.column_names), head, section)[0].type


# ------------------------------------------------------------------------------------------- entry


def prepare_datasets(cfg: Any, tokenizer: Any, rank: int = 0, *, on_bad_row: str = "error",
                     use_cache: bool = True, chunk_size: int = 1000) -> PreparedData:
    """Tokenize, truncate and pack the configured datasets (or reuse the cache); see module docstring.

    `rank` is the node rank (it picks `worker_output_dir/node-{rank}`). `chunk_size` rows go to a worker
    at a time.
    """
    started = time.perf_counter()
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    opts = data_options(cfg)
    train_cfgs = tuple(getattr(cfg, "datasets", None) or ())
    val_cfgs = tuple(getattr(cfg, "validation_datasets", None) or ())
    if not train_cfgs:
        raise UserError("datasets: at least one training dataset is required")
    if opts.agent_template is not None and opts.agent_template not in AGENT_TEMPLATES:
        raise UserError(f"agent_template: unknown agent template {opts.agent_template!r}; "
                        f"choose one of {', '.join(AGENT_TEMPLATES)}")
    sources: list[Source] = [resolve_source(d, i, "datasets") for i, d in enumerate(train_cfgs)]
    sources += [resolve_source(d, i, "validation_datasets") for i, d in enumerate(val_cfgs)]
    source_notes = [note for s in sources for note in s.notes]  # shown in the start summary / data report
    # Only hub datasets are loaded before the cache lookup: their cache key needs the loaded dataset's
    # fingerprint. Files are identified by path/size/mtime, so a cache hit never reads (scans) them.
    early = {i: load_source(s, on_bad_row) for i, s in enumerate(sources) if s.kind == "hub"}
    pad_id = pad_token_id(tokenizer)
    try:  # resolved up front so that the template's source is part of the cache key
        template, template_error = resolve_template(tokenizer, opts.use_chat_template, opts.template), None
    except UserError as exc:  # only an error if some dataset turns out to need a chat template
        template, template_error = ChatTemplate("none", ""), exc
    key_parts = {
        "options": opts.cache_fields(),
        "datasets": [_ds_dict(d) for d in train_cfgs],
        "validation_datasets": [_ds_dict(d) for d in val_cfgs],
        "data": [dataset_fingerprint(s, early.get(i)) for i, s in enumerate(sources)],
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "pad_token_id": pad_id,
        "template": template.source,
        "on_bad_row": on_bad_row,  # a cache built skipping bad rows must not satisfy a strict run
    }
    folder = (ensure_cache_root(cfg, rank) if use_cache else cache_root(cfg, rank)) / cache_key(key_parts)
    if use_cache and entry_ready(folder):
        cached = _load_entry_or_discard(folder, started)
        if cached is not None:
            logger.info("reusing tokenized data from %s", folder)
            cached.stats.source_notes = source_notes + cached.stats.option_notes
            return cached
    loaded = [early[i] if i in early else load_source(s, on_bad_row) for i, s in enumerate(sources)]

    specs: list[DatasetSpec] = []
    detected: list[str] = []
    for source, ds, ds_cfg in zip(sources, loaded, train_cfgs + val_cfgs, strict=True):
        head = [r for r in _rows(ds, 0, min(5, len(ds))) if not isinstance(r, BadRow)]
        spec, note = resolve_spec(ds_cfg, source.index, list(ds.column_names), head, source.section)
        specs.append(spec)  # position in `specs` == position in `loaded`: the encoder's dataset index
        if note:
            logger.info("detected %s", note)
            detected.append(note)
    chat = any(s.type == "conversation" or (s.type == "instruction" and opts.use_chat_template
                                            and s.prompt_format is None and s.prompt_format_no_input is None)
               for s in specs)
    if chat and template_error is not None:
        raise template_error
    option_notes = _unused_options(opts, specs, chat)  # shown with source_notes (start summary, tokenize)
    if not chat:
        template = ChatTemplate("none", "")
    encoder = Encoder(tokenizer, template, opts, specs, on_bad_row)

    n_train = len(train_cfgs)
    masks = _eval_masks([len(ds) for ds in loaded[:n_train]], 0.0 if val_cfgs else opts.validation_split_ratio,
                        opts.eval_seed)
    eval_masks = masks + [np.ones(len(ds), dtype=bool) for ds in loaded[n_train:]]
    rows_in = {"train": int(sum(np.count_nonzero(~m) for m in eval_masks)),
               "eval": int(sum(np.count_nonzero(m) for m in eval_masks))}
    # Tiny inputs are encoded in-process: starting workers would cost more than it saves.
    workers = opts.num_workers if sum(len(ds) for ds in loaded) > chunk_size else 0
    merged = {"train": EncodeResult(), "eval": EncodeResult()}
    for split_name, result in _encode_tasks(encoder, _iter_tasks(loaded, eval_masks, chunk_size), workers):
        merged[split_name].extend(result)
    counts = merged["train"].counts + merged["eval"].counts
    if not merged["train"].docs:
        raise UserError(f"datasets: no training documents left after tokenization ({dict(counts)}); check "
                        "max_length / truncation_strategy and the data")
    train = _pack(merged["train"].docs, opts, pad_id)
    evals = _pack(merged["eval"].docs, opts, pad_id) if merged["eval"].docs else None
    stats = DataStats(
        train=SplitStats.of(train, rows_in["train"]),
        eval=SplitStats.of(evals, rows_in["eval"]) if evals is not None else None,
        counts=dict(counts),
        skipped_examples=(merged["train"].skipped + merged["eval"].skipped)[:_MAX_SKIPPED_SHOWN],
        detected=detected, source_notes=source_notes + option_notes, option_notes=option_notes,
        template=template.name,
        cache_dir=str(folder) if use_cache else None,
        rows_tokenized=rows_in["train"] + rows_in["eval"], num_workers=workers)
    data = PreparedData(train, evals, stats)
    stats.seconds = time.perf_counter() - started
    if use_cache:
        try:
            _save_entry(folder, data, key_parts)
        except OSError as exc:  # disk full, permissions changed since ensure_cache_root, ...
            raise UserError(f"{cache_root_origin(cfg)}: cannot write the tokenized cache entry {folder} "
                            f"({exc.strerror or exc})") from None
        # Serve the memory-mapped copy, like a cache hit does, so both paths behave the same.
        data = PreparedData(TokenizedSplit.load(folder / "train"),
                            TokenizedSplit.load(folder / "eval") if evals is not None else None, stats)
    return data
