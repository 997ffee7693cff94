"""Sources read by the `datasets` library: Parquet, CSV and Arrow files (local or URL), `save_to_disk` folders and
hub ids (`sources.load_source` reads JSON, JSON Lines and text files itself, see `linefiles.py`).

CSV cells are read as the text written (no type inference). Errors are `UserError`s naming the dataset and the
innermost cause (`datasets` wraps the real reason in a generic error); a compressed file that does not decompress
is named. A column `datasets` stored as JSON (mixed value types) is a warning: strings in it come back decoded.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from surogate.errors import UserError

if TYPE_CHECKING:
    from .sources import Source


def load_table(source: Source):
    """The rows of `source` as a `datasets.Dataset` (its first `samples` rows); `UserError` when it cannot be read
    or has no rows."""
    ds = _load_with_datasets(source)
    if len(ds) == 0:
        raise UserError(f"{source.where}: could not load {source.path!r}: "
                        f"{'file is empty' if len(source.files) == 1 else 'its files are empty'} (no rows)")
    _warn_json_columns(source, ds)
    if source.samples is not None:
        ds = ds.select(range(min(int(source.samples), len(ds))))
    return ds


def _load_with_datasets(source: Source):
    import datasets

    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity_error()
    try:
        with _quiet_datasets():
            return _read(source)
    except UserError:
        raise
    except Exception as exc:  # the datasets library raises many types for unreadable / unreachable data
        _raise_if_not_decompressing(source)
        hint = ""
        if source.kind == "hub":
            offline = bool(getattr(datasets.config, "HF_HUB_OFFLINE", False)) or \
                os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
            hint = (" (offline: the dataset is not in the local Hugging Face cache; download it first or point "
                    "path at local files)" if offline else
                    " (not a local file or folder either; check the hub id, subset and split)")
        raise UserError(f"{source.where}: could not load {source.path!r}{hint}: {_root_cause(exc)}") from None


def _read(source: Source):
    import datasets

    if source.kind == "disk":
        ds = datasets.load_from_disk(source.files[0])
        if isinstance(ds, datasets.DatasetDict):
            if source.split not in ds:
                raise UserError(f"{source.section}[{source.index}].split: {source.split!r} not in "
                                f"{source.path!r} (splits: {', '.join(ds)})")
            ds = ds[source.split]
        return ds
    if source.kind in ("local", "url"):
        files = _files_with_rows(source)
        extra = _csv_as_text(files) if source.builder == "csv" else {}
        return datasets.load_dataset(source.builder, data_files=files, split="train", **extra)
    return datasets.load_dataset(source.path, name=source.subset, split=source.split)


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """No `datasets` log lines while it loads: it logs some errors before raising them ("Failed to read schema
    from '...' with error ArrowInvalid: ..."), and the raised error becomes our one message (`UserError`)."""
    import datasets

    log = datasets.utils.logging
    before = log.get_verbosity()
    log.set_verbosity(log.CRITICAL)
    try:
        yield
    finally:
        log.set_verbosity(before)


def _raise_if_not_decompressing(source: Source) -> None:
    """`UserError` naming the first compressed file of `source` that does not decompress (`datasets` says only
    "Compressed file ended before the end-of-stream marker was reached", not which file)."""
    from .filekinds import DECOMPRESSION_ERRORS, check_decompresses, is_compressed, read_problem

    for path in (f for f in source.files if source.kind in ("local", "url") and is_compressed(f)):
        try:
            check_decompresses(path)
        except DECOMPRESSION_ERRORS as exc:
            which = "" if len(source.files) == 1 else f"file {path!r} "
            raise UserError(f"{source.where}: could not load {source.path!r}: {which}cannot read it "
                            f"({read_problem(path, exc)})") from None


def _files_with_rows(source: Source) -> list[str]:
    """The files of a local or URL source that hold a row. `datasets` fails on a file without rows, also among
    others: 'Instruction "train" corresponds to no data!' (a CSV header without rows, an Arrow file of no
    batches), 'BatchSize must be greater than 0' (a Parquet file of no rows), 'No columns to parse from file' (an
    empty CSV). `UserError` saying so when no file has a row, as for empty JSON Lines files."""
    no_rows = {"csv": _csv_no_rows, "parquet": _parquet_no_rows, "arrow": _arrow_no_rows}[source.builder]
    empty = {path: why for path in source.files if (why := _read_check(source, path, no_rows))}
    if len(empty) < len(source.files):
        return [f for f in source.files if f not in empty]
    what = f"file {empty[source.files[0]]}" if len(source.files) == 1 else \
        f"its {len(source.files)} files have no rows"
    raise UserError(f"{source.where}: could not load {source.path!r}: {what}")


def _read_check(source: Source, path: str, check: Callable[[str], str | None]) -> str | None:
    """`check(path)`; a file it cannot read is a `UserError` naming the file (`datasets` logs the file's name on
    stderr and raises an error without it)."""
    from .filekinds import DECOMPRESSION_ERRORS, is_compressed, read_problem

    try:
        return check(path)
    except Exception as exc:  # pyarrow / csv / decompression errors of a file that is not what it says
        if is_compressed(path) and isinstance(exc, DECOMPRESSION_ERRORS):
            which, problem = ("" if len(source.files) == 1 else f"file {path!r} "), \
                f"cannot read it ({read_problem(path, exc)})"
        else:
            which, problem = ("" if len(source.files) == 1 else f"file {path!r}: "), _root_cause(exc)
        raise UserError(f"{source.where}: could not load {source.path!r}: {which}{problem}") from None


def _csv_no_rows(path: str) -> str | None:
    """None when the CSV file has a record after its header line, else what it has."""
    import csv
    import io

    from .filekinds import open_binary

    with open_binary(path) as f:
        records = csv.reader(io.TextIOWrapper(f, encoding="utf-8-sig", newline=""))
        if not next(records, None):
            return "is empty (no rows)"
        return None if any(records) else "has a header line and no rows"


def _parquet_no_rows(path: str) -> str | None:
    import pyarrow.parquet as pq

    from .filekinds import open_binary

    with open_binary(path) as f:
        return None if pq.ParquetFile(f).metadata.num_rows else "has no rows"


def _arrow_no_rows(path: str) -> str | None:
    """As `datasets` reads it: an Arrow stream, else an Arrow (IPC) file."""
    import pyarrow as pa

    from .filekinds import open_binary

    with open_binary(path) as f:
        try:
            batches = iter(pa.ipc.open_stream(f))
        except (OSError, pa.ArrowInvalid):
            reader = pa.ipc.open_file(f)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        return None if any(batch.num_rows for batch in batches) else "has no rows"


def _csv_as_text(files: list[str]) -> dict[str, Any]:
    """`load_dataset("csv")` options that keep every cell as the text written: CSV has no types, but pandas
    infers them ("007" -> 7.0, "48" -> 48, "null" / "NA" / an empty cell -> null), which changed the training
    data (or made a text column of numbers a "wrong type" error). Every column named in a header is read as a
    string; an empty cell is the empty string."""
    import csv
    import io

    from .filekinds import open_binary

    names: dict[str, None] = {}
    for path in files:
        with open_binary(path) as f:
            header = next(csv.reader(io.TextIOWrapper(f, encoding="utf-8-sig", newline="")), [])
        names.update(dict.fromkeys(header))
    return {"converters": dict.fromkeys(names, str), "na_filter": False}


def _root_cause(exc: BaseException) -> str:
    """'Type: first line' of the innermost cause: `datasets` wraps the real reason (e.g. a parse error)
    in a generic DatasetGenerationError whose own message says nothing about the file."""
    seen = {id(exc)}
    while (inner := exc.__cause__ or exc.__context__) is not None and id(inner) not in seen:
        seen.add(id(inner))
        exc = inner
    text = str(exc).strip()
    if not text and isinstance(exc, StopIteration):
        return "file is empty (no rows)"
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def _json_columns(feature, path: str = "") -> list[str]:
    """Paths of the `datasets.Json` features inside `feature` (a Features dict, List, or leaf)."""
    import datasets

    if isinstance(feature, datasets.Json):
        return [path or "<root>"]
    if isinstance(feature, dict):
        return [p for k, v in feature.items() for p in _json_columns(v, f"{path}.{k}" if path else k)]
    inner = getattr(feature, "feature", None)
    return _json_columns(inner, f"{path}[]") if inner is not None else []


def _warn_json_columns(source: Source, ds) -> None:
    """Say so when `datasets` stored a mixed-type column as JSON: it decodes strings that look like JSON
    ("48" -> 48, "null" -> None), so such values may differ from the files (local files are read exactly)."""
    columns = _json_columns(getattr(ds, "features", None) or {})
    if columns:
        import logging

        logging.getLogger("surogate.data").warning(
            "%s %r: the datasets library stored %s as JSON (mixed value types); strings in it that look like "
            "JSON (e.g. \"48\", \"null\") come back decoded. Point path at the JSON/JSONL files to read them "
            "exactly.", source.where, source.path, ", ".join(columns))
