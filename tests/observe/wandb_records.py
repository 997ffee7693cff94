"""Test helper: read the records of an offline wandb run file (`run-<id>.wandb`).

The file is a LevelDB-style log (7-byte header ':W&B' + magic + version, 32 KiB blocks, records split
into FULL/FIRST/MIDDLE/LAST chunks) of `wandb_internal_pb2.Record` protobufs; wandb ships no reader.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

BLOCK = 32768
HEADER = struct.Struct("<IHB")  # crc32c, length, chunk type


def raw_records(path: Path):
    data = path.read_bytes()
    ident, magic, _version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1, "not a wandb run file"
    pos, pending = 7, b""
    while pos + HEADER.size <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER.size:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = HEADER.unpack_from(data, pos)
        pos += HEADER.size
        if kind == 0 and length == 0:
            break
        chunk, pos = data[pos : pos + length], pos + length
        if kind == 1:
            yield chunk
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            yield pending + chunk
            pending = b""


def read_finished_run(path: Path, timeout: float = 20.0) -> dict:
    """`read_run` once the exit record is on disk: wandb's service process may still be writing the
    file when `finish()` returns."""
    deadline = time.monotonic() + timeout
    while True:
        run = read_run(path)
        if run["exit"] is not None or time.monotonic() > deadline:
            return run
        time.sleep(0.2)


def read_run(path: Path) -> dict:
    """{'run': Record.run, 'config': {...}, 'history': [row, ...], 'summary': {...}, 'exit': Record.exit}."""
    from wandb.proto import wandb_internal_pb2 as pb

    out: dict = {"run": None, "config": {}, "history": [], "summary": {}, "exit": None, "kinds": []}

    def key(item):
        return item.key or "/".join(item.nested_key)

    for raw in raw_records(path):
        rec = pb.Record()
        rec.ParseFromString(raw)
        kind = rec.WhichOneof("record_type")
        out["kinds"].append(kind)
        if kind == "run":
            out["run"] = rec.run
            out["config"].update({key(i): json.loads(i.value_json) for i in rec.run.config.update})
        elif kind == "config":
            out["config"].update({key(i): json.loads(i.value_json) for i in rec.config.update})
        elif kind == "history":
            out["history"].append({key(i): json.loads(i.value_json) for i in rec.history.item})
        elif kind == "summary":
            out["summary"].update({key(i): json.loads(i.value_json) for i in rec.summary.update})
        elif kind == "exit":
            out["exit"] = rec.exit
    return out
