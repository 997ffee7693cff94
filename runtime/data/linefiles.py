"""Exact reading of JSON, JSON Lines and text files (local paths and fsspec URLs).

Why not the `datasets` JSON builder: when a column mixes value types (plain-string `content` in most rows,
OpenAI-style content parts in one), it stores the column as JSON text and keeps every string that already
parses as JSON unquoted, so decoding turns the string "48" into the int 48, "null" into None and
'"hi"' into 'hi' -- the training data changes silently. Here every row is parsed with `json.loads` from
the bytes as written, so every value is kept exactly.

Memory: JSON Lines and text files are scanned once (validating every line and collecting the column
names) and only the byte offset and line number of each row are kept (16 bytes a row); rows are re-read and parsed a chunk
at a time when the pipeline asks for them. A `.json` file holding one JSON array (or one object of
equal-length columns) is parsed whole (as the `datasets` builder does). Text files give one row per line (column `text`, blank lines included, line
break removed), like the `datasets` text builder. Compressed files (`.jsonl.gz`, `.txt.xz`, ...) are read through
`filekinds.open_binary`: offsets count in the decompressed data, line numbers are the same as in the plain file,
and data that does not decompress is an error naming the file.

A line that is not valid UTF-8, not valid JSON or not a JSON object is an error naming the file and the
line (`on_bad_row="error"`), or a `BadRow` in its place that the encoder counts as skipped
(`on_bad_row="skip"`).
"""

from __future__ import annotations

import codecs
import json
from array import array
from bisect import bisect_right
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from surogate.errors import UserError

from .errors import BadRow
from .filekinds import DECOMPRESSION_ERRORS, is_compressed, open_binary, read_problem, suffixes

_PEEK = 1 << 16  # bytes read to tell a JSON array from JSON Lines


class LoadError(Exception):
    """A file that cannot be read at all (the caller turns it into a `UserError` naming the dataset)."""


def _decode(raw: bytes, line_no: int) -> str | BadRow:
    """UTF-8 text of one line, or a `BadRow` saying where the first invalid byte is."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return BadRow(f"line {line_no}: not valid UTF-8 text (byte 0x{raw[exc.start]:02x} at column "
                      f"{exc.start + 1})", "invalid_utf8")


def _lone_surrogate(value: Any) -> str | None:
    """The first string (key or value) in `value` that is not text: it holds a lone UTF-16 surrogate, which
    JSON's `\\ud800` escape can write but no tokenizer can read (it has no UTF-8 form). Iterative: rows nest."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as exc:
                return f"\\u{ord(item[exc.start]):04x}"
    return None


def _parsed_row(text: str, where: str) -> dict | BadRow:
    """A JSON object parsed from `text` exactly, or a `BadRow` (problem prefixed by `where`, e.g. 'line 3')."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        return BadRow(f"{where}: invalid JSON ({getattr(exc, 'msg', exc)} at column "
                      f"{getattr(exc, 'colno', '?')})", "invalid_json")
    except RecursionError:
        return BadRow(f"{where}: invalid JSON (nested too deeply to read)", "invalid_json")
    if not isinstance(value, dict):
        return BadRow(f"{where}: expected a JSON object, got {type(value).__name__}", "invalid_json")
    return _text_only(value, where) if "\\u" in text else value


def _text_only(row: dict, where: str) -> dict | BadRow:
    bad = _lone_surrogate(row)
    if bad is None:
        return row
    return BadRow(f"{where}: a string holds the escape {bad}, a lone UTF-16 surrogate: not text (no UTF-8 form)",
                  "invalid_text")


def _json_row(raw: bytes, line_no: int) -> dict | BadRow:
    """One JSON Lines row: a JSON object parsed exactly, or a `BadRow`."""
    text = _decode(raw, line_no)
    if isinstance(text, BadRow):
        return text
    return _parsed_row(text, f"line {line_no}")


def _text_row(raw: bytes, line_no: int) -> dict | BadRow:
    """One text-file row: the line without its line break (\\n or \\r\\n)."""
    text = _decode(raw, line_no)
    if isinstance(text, BadRow):
        return text
    for ending in ("\r\n", "\n"):
        if text.endswith(ending):
            return {"text": text[:-len(ending)]}
    return {"text": text}


def _strip_bom(raw: bytes) -> bytes:
    # A leading UTF-8 byte-order mark is not part of the first row.
    return raw[len(codecs.BOM_UTF8):] if raw.startswith(codecs.BOM_UTF8) else raw


def _with_file(bad: BadRow, path: str) -> BadRow:
    return BadRow(f"file {path!r} {bad.problem}", bad.reason)


@dataclass
class _LinePart:
    """One file read line by line: the offset of each row (in the decompressed data of a compressed file); bad
    rows (skip mode) by row number. A compressed file stays open between reads of consecutive chunks: seeking
    backwards in it decompresses from the start again."""

    path: str
    parse: Callable[[bytes, int], dict | BadRow]
    starts: array = field(default_factory=lambda: array("q"))
    lines: array = field(default_factory=lambda: array("q"))
    bad: dict[int, BadRow] = field(default_factory=dict)
    _reader: Any = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.starts)

    def rows(self, start: int, stop: int) -> list:
        """Rows start..stop-1, parsed again from the file (already validated by the scan)."""
        out: list = []
        f, self._reader = self._reader, None
        done = False
        try:
            f = f or open_binary(self.path)
            for i in range(start, stop):
                if i in self.bad:
                    out.append(self.bad[i])
                    continue
                f.seek(self.starts[i])
                raw = f.readline()
                row = self.parse(_strip_bom(raw) if self.starts[i] == 0 else raw, self.lines[i])
                if isinstance(row, BadRow):  # valid when scanned: the file changed since
                    raise UserError(f"{self.path!r} changed while it was being read ({row.problem}); run again")
                out.append(row)
            done = True
        except DECOMPRESSION_ERRORS as exc:  # readable when scanned: the file changed since
            raise UserError(f"{self.path!r} changed while it was being read (cannot read it: "
                            f"{read_problem(self.path, exc)}); run again") from None
        finally:
            if f is not None and done and stop < len(self) and is_compressed(self.path):
                self._reader = f  # the next chunk starts where this one ended
            elif f is not None:
                f.close()
        return out


@dataclass
class _ListPart:
    """One `.json` file holding a JSON document (an array, or an object of columns), parsed whole."""

    items: list

    def __len__(self) -> int:
        return len(self.items)

    def rows(self, start: int, stop: int) -> list:
        return self.items[start:stop]


class FileRows:
    """The rows of one source's files, read exactly (see module docstring).

    Offers what the pipeline uses of a `datasets.Dataset`: `len`, `column_names`, `ds[name]` (a column),
    `ds[i]` (a row), `rows(start, stop)` and `select(range(n))` (the first n rows).
    """

    def __init__(self, parts: list, columns: dict[str, None], good: int):
        self._parts = parts
        self._bounds = [0]
        for part in parts:
            self._bounds.append(self._bounds[-1] + len(part))
        self.column_names = list(columns)
        self.good_rows = good
        self._length = self._bounds[-1]

    def __len__(self) -> int:
        return self._length

    def rows(self, start: int, stop: int) -> list:
        """Rows start..stop-1 as dicts (a `BadRow` where a row could not be read in skip mode)."""
        stop = min(stop, self._length)
        out: list = []
        while start < stop:
            p = bisect_right(self._bounds, start) - 1
            base = self._bounds[p]
            end = min(stop, self._bounds[p + 1])
            out.extend(self._parts[p].rows(start - base, end - base))
            start = end
        return out

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            return [r.get(key) if isinstance(r, dict) else None for r in self.rows(0, self._length)]
        if isinstance(key, int):
            if not -self._length <= key < self._length:
                raise IndexError(key)
            key %= self._length
            return self.rows(key, key + 1)[0]
        raise TypeError(f"FileRows indices are column names or ints, not {type(key).__name__}")

    def select(self, indices: range) -> FileRows:
        """The first `len(indices)` rows (only prefixes are needed: `samples`)."""
        if not isinstance(indices, range) or indices.start != 0 or indices.step != 1:
            raise ValueError("FileRows.select takes range(n)")
        return FileRows._prefix(self, min(len(indices), self._length))

    @staticmethod
    def _prefix(rows: FileRows, n: int) -> FileRows:
        clone = object.__new__(FileRows)
        clone.__dict__.update(rows.__dict__)
        clone._length = n
        return clone


# ------------------------------------------------------------------------------------------- scanning


@dataclass
class _Scan:
    """State of one source's scan: column names in first-seen order, counts, the row limit."""

    skip_bad: bool
    limit: int | None
    columns: dict[str, None] = field(default_factory=dict)
    total: int = 0
    good: int = 0
    first_bad: BadRow | None = None

    def full(self) -> bool:
        return self.limit is not None and self.total >= self.limit

    def add(self, row: dict | BadRow, path: str) -> BadRow | None:
        """Count `row`; a `BadRow` is returned (skip mode, named with its file) or raised as `LoadError`."""
        self.total += 1
        if isinstance(row, BadRow):
            bad = _with_file(row, path)
            if not self.skip_bad:
                raise LoadError(row.problem)
            self.first_bad = self.first_bad or bad
            return bad
        self.good += 1
        for key in row:
            if key not in self.columns:
                self.columns[key] = None
        return None


def _scan_lines(path: str, parse: Callable, skip_blank: bool, scan: _Scan) -> _LinePart:
    """Validate every line of `path` and keep each row's offset (blank JSON Lines are not rows)."""
    part = _LinePart(path, parse)
    offset = 0
    with open_binary(path) as f:
        for line_no, raw in enumerate(iter(f.readline, b""), start=1):
            start, offset = offset, offset + len(raw)
            if scan.full():
                break
            body = _strip_bom(raw) if start == 0 else raw
            if skip_blank and not body.strip():
                continue
            bad = scan.add(parse(body, line_no), path)
            if bad is not None:
                part.bad[len(part.starts)] = bad
            part.starts.append(start)
            part.lines.append(line_no)
    return part


def _json_error_line(data: bytes, exc: Exception) -> str:
    """'line L: <reason>' for an error parsing a whole JSON document."""
    if isinstance(exc, UnicodeDecodeError):
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        return f"line {line}: not valid UTF-8 text (byte 0x{data[exc.start]:02x} at column {column})"
    return f"line {exc.lineno}: invalid JSON ({exc.msg} at column {exc.colno})"


def _read_document(path: str) -> tuple[Any, bool]:
    """The whole file parsed as one JSON value, and whether it has `\\u` escapes (lone surrogates are possible);
    `LoadError` naming the line of a UTF-8 or JSON error."""
    with open_binary(path) as f:
        data = _strip_bom(f.read())
    try:
        return json.loads(data.decode("utf-8")), b"\\u" in data
    except (UnicodeDecodeError, ValueError) as exc:
        raise LoadError(_json_error_line(data, exc)) from None
    except RecursionError:
        raise LoadError("invalid JSON (nested too deeply to read)") from None


def _document_rows(value: Any, escapes: bool = True) -> Iterator[dict | BadRow]:
    """The rows of a whole-file JSON value: the items of an array (objects; strings become {"text": ...}), or
    of one object of equal-length columns ({"col": [v0, v1, ...]}, as `json.dump` of a dict of lists writes it
    and `datasets` reads it: row i takes element i of every column). `escapes`: check strings for lone
    surrogates (only a `\\u` escape writes one)."""
    check = _text_only if escapes else (lambda row, where: row)
    if isinstance(value, list):
        for i, item in enumerate(value):
            row = {"text": item} if isinstance(item, str) else item
            yield check(row, f"item {i}") if isinstance(row, dict) else BadRow(
                f"item {i}: expected a JSON object, got {type(item).__name__}", "invalid_json")
        return
    columns = value if isinstance(value, dict) and value else {}
    lengths = {len(v) for v in columns.values() if isinstance(v, list)}
    if not columns or len(lengths) != 1 or not all(isinstance(v, list) for v in columns.values()):
        raise LoadError("expected JSON Lines (one object per line), a JSON array of objects, or one object whose "
                        "values are equal-length lists (columns)")
    for i in range(lengths.pop()):
        yield check({k: v[i] for k, v in columns.items()}, f"item {i}")


def _scan_document(path: str, scan: _Scan) -> _ListPart:
    """Parse a file holding one JSON document (an array, or an object of columns) whole."""
    rows: list = []
    for row in _document_rows(*_read_document(path)):
        if scan.full():
            break
        bad = scan.add(row, path)
        rows.append(bad if bad is not None else row)
    return _ListPart(rows)


def _is_document(path: str) -> bool:
    """True when `path` is one JSON document rather than JSON Lines: its first non-blank byte is '[' (an array),
    or it is a `.json` file (`.jsonl` is always JSON Lines, whose broken lines are bad rows) whose first line
    starts with '{' and is not a whole value (a multi-line object)."""
    with open_binary(path) as f:
        while chunk := f.read(_PEEK):
            body = _strip_bom(chunk).lstrip()
            if body:
                if body.startswith(b"["):
                    return True
                break
        if suffixes(path)[0] != ".json":
            return False
        f.seek(0)
        first = _strip_bom(f.readline())
    if not first.lstrip().startswith(b"{"):
        return False
    try:
        json.loads(first.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return True
    return False


def scan_files(files: list[str], builder: str, on_bad_row: str, limit: int | None) -> FileRows:
    """Scan `files` (builder "json" or "text") into `FileRows`; `LoadError` naming the file on failure."""
    scan = _Scan(skip_bad=on_bad_row == "skip", limit=limit)
    parts: list = []
    for path in files:
        if scan.full():
            break
        try:
            if builder == "text":
                parts.append(_scan_lines(path, _text_row, False, scan))
            elif _is_document(path):
                parts.append(_scan_document(path, scan))
            else:
                parts.append(_scan_lines(path, _json_row, True, scan))
        except LoadError as exc:
            raise LoadError(f"{_which(path, files)}{exc}") from None
        except DECOMPRESSION_ERRORS as exc:  # OSError, or bad compressed data
            raise LoadError(f"{_which(path, files)}cannot read it ({read_problem(path, exc)})") from None
    if scan.total == 0:
        raise LoadError("file is empty (no rows)" if len(files) == 1 else f"its {len(files)} files are empty (no rows)")
    if scan.good == 0:  # skip mode, every row bad: nothing to infer columns from
        raise LoadError(f"no readable rows; the first: {scan.first_bad.problem}")
    return FileRows(parts, scan.columns, scan.good)


def _which(path: str, files: list[str]) -> str:
    """How an error names the file: implicit when the source is that one file (the message already names
    it), else its path."""
    return "" if len(files) == 1 else f"file {path!r} "
