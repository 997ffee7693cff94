"""Crash-safe writes: files and folders that readers see whole or not at all (temp + fsync + rename).

Used by checkpoints (`runtime.checkpoint`) and exports (`runtime.export`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import torch


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def sha256_of(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_atomic_text(path: Path, text: str) -> None:
    """Write a small file so readers see the old or the new content, never a mix (temp + fsync + replace)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def owned_host_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Host tensors that each own their storage, as safetensors requires.

    Device tensors are copied to the host anyway; host views into a larger buffer (arena views), tied
    names and non-contiguous tensors are cloned; everything else is written without a copy.
    """
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"checkpoint tensor {name!r} is a {type(t).__name__}, not a torch.Tensor")
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        else:
            storage = t.untyped_storage()
            owns = storage.nbytes() == t.numel() * t.element_size() and storage.data_ptr() not in seen
            if not (owns and t.is_contiguous()):
                t = t.clone(memory_format=torch.contiguous_format)
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def publish_dir(tmp: Path, final: Path, stage: Callable[[str], None] | None = None) -> None:
    """Rename a finished, fsynced temp folder into place; an existing `final` is replaced (moved aside, then removed).

    `stage`: test seam called between the two renames (the only window where `final` is absent).
    """
    old = None
    if final.exists():
        old = final.with_name(f"{final.name}.old-{os.getpid()}")
        os.rename(final, old)
        if stage is not None:
            stage("moved_aside")
    os.rename(tmp, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(final: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temp folder beside `final`; on success fsync its files and rename it to `final`.

    On any exception the temp folder is removed and `final` (if it existed) is left untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                fsync_file(f)
        fsync_dir(tmp)
        publish_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftovers are stale: this process is not inside a save right now
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
