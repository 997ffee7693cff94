"""Which data files are read, by which builder, and how they are opened.

A file's kind is its extension (`.jsonl`, `.parquet`, ...). JSON, JSON Lines, CSV and text files may also be
compressed (`.jsonl.gz`, `.csv.bz2`, `.txt.xz`): `open_binary` decompresses them on the fly, so the readers see
the same bytes as for the plain file (line numbers and offsets count in the decompressed text). Parquet and Arrow
files compress inside the format, and Arrow files are memory-mapped, so `.parquet.gz` / `.arrow.gz` are not data
files. A compressed file that cannot be decompressed (not that format, truncated, corrupt) raises one of
`DECOMPRESSION_ERRORS`; `read_problem` says which in words.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import zlib
from typing import BinaryIO

BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text",
            ".arrow": "arrow"}
COMPRESSIONS = {".gz": "gzip", ".bz2": "bzip2", ".xz": "xz"}
_COMPRESSIBLE = (".json", ".jsonl", ".csv", ".txt")
_OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
# What a decompressing reader raises on bad data: gzip's BadGzipFile and bz2's "Invalid data stream" are
# OSErrors, a truncated stream is an EOFError, bad deflate / xz data a zlib.error / LZMAError.
DECOMPRESSION_ERRORS: tuple[type[BaseException], ...] = (OSError, EOFError, zlib.error, lzma.LZMAError)
SUPPORTED = f"{', '.join(BUILDERS)} ({', '.join(_COMPRESSIBLE)} also compressed: {', '.join(COMPRESSIONS)})"


def suffixes(name: str) -> tuple[str, str | None]:
    """(data extension, compression suffix or None) of a file name: 'a.jsonl.gz' -> ('.jsonl', '.gz')."""
    stem, ext = os.path.splitext(os.path.basename(name).lower())
    if ext in COMPRESSIONS:
        return os.path.splitext(stem)[1], ext
    return ext, None


def file_type(name: str) -> str:
    """The extension(s) that decide a file's kind, for messages: '.jsonl.gz', '.md'."""
    ext, compression = suffixes(name)
    return ext + (compression or "")


def builder_of(name: str) -> str | None:
    """The builder that reads the file (json, text, csv, parquet, arrow), or None for other files (and for
    hidden files: `.gitattributes`, editor swap files)."""
    if os.path.basename(name).startswith("."):
        return None
    ext, compression = suffixes(name)
    if compression is not None and ext not in _COMPRESSIBLE:
        return None
    return BUILDERS.get(ext)


def is_compressed(name: str) -> bool:
    return suffixes(name)[1] is not None


def open_binary(path: str) -> BinaryIO:
    """A binary reader of the file's data (decompressed) for a local path or an fsspec URL; it supports seek
    (forward cheaply; backward on a compressed file re-reads from the start) and readline."""
    compression = suffixes(path)[1]
    if "://" not in path:
        return open(path, "rb") if compression is None else _OPENERS[compression](path, "rb")
    import fsspec

    raw = fsspec.open(path, "rb").open()
    if compression is None:
        return raw
    reader = _OPENERS[compression](raw, "rb")  # does not close a file object it was given: chain the close
    close = reader.close

    def close_both() -> None:
        try:
            close()
        finally:
            raw.close()

    reader.close = close_both  # type: ignore[method-assign]
    return reader


def read_problem(path: str, exc: BaseException) -> str:
    """Why `path` could not be read, in words (for 'cannot read it (...)')."""
    compression = suffixes(path)[1]
    if compression is not None and not (isinstance(exc, OSError) and exc.errno is not None):
        kind = COMPRESSIONS[compression]
        if isinstance(exc, EOFError):
            return f"the {kind} data is truncated: {exc}"
        return f"not valid {kind} data: {exc}"
    return str(getattr(exc, "strerror", None) or exc)


def check_decompresses(path: str) -> None:
    """Read a compressed file through (raises one of `DECOMPRESSION_ERRORS` where it is bad)."""
    with open_binary(path) as f:
        while f.read(1 << 20):
            pass
