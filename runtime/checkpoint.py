"""Atomic, rotated, resumable training checkpoints.

Layout of one checkpoint (`<checkpoint_dir>/checkpoint-<step>/`):
    tensors.safetensors   weights, optimizer tensors, torch RNG states (`__rng__.*`, uint8)
    state.json            JSON-able training state (optimizer scalars, LR schedule, data position, ...),
                          the Python/NumPy RNG words and the step
    manifest.json         written last: format version, step, size and sha256 of every other file

A save writes into `checkpoint-<step>.tmp-<pid>/`, fsyncs every file and the folder, renames it to
`checkpoint-<step>/`, fsyncs the parent, then replaces the `latest` pointer file atomically, then
rotates. A crash at any moment leaves either the previous state or the new one: a `.tmp-*` folder
(ignored and later removed) or a complete, verifiable checkpoint. `latest()` trusts only manifests.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from surogate.errors import UserError
from surogate.runtime import rng as rng_mod
from surogate.runtime.atomic_files import (
    fsync_dir,
    fsync_file,
    owned_host_tensors,
    pid_alive,
    publish_dir,
    sha256_of,
    write_atomic_text,
)
from surogate.runtime.checkpoint_config import check_config_compatible, config_fingerprint, is_fingerprint

log = logging.getLogger(__name__)

FORMAT = "surogate-checkpoint"
FORMAT_VERSION = 1
TENSORS_FILE = "tensors.safetensors"
STATE_FILE = "state.json"
MANIFEST_FILE = "manifest.json"
LATEST_FILE = "latest"
_NAME = re.compile(r"^checkpoint-(\d+)$")
_TMP = re.compile(r"^checkpoint-(\d+)\.(tmp|old|del)-(\d+)$")
_LATEST_TMP = re.compile(r"^\.latest\.tmp-(\d+)$")


@dataclass
class Checkpoint:
    """What `load()` returns."""

    path: Path
    step: int
    tensors: dict[str, torch.Tensor]
    state: dict[str, Any]
    rng: rng_mod.RngState | None

    def restore_rng(self) -> None:
        """Put the Python/NumPy/torch generators back to their state at save time."""
        if self.rng is None:
            raise UserError(f"{self.path}: this checkpoint was saved without random-generator state")
        rng_mod.restore(self.rng)


class CheckpointManager:
    """Saves, rotates, finds and loads checkpoints in one folder."""

    def __init__(self, checkpoint_dir: str | os.PathLike, save_total_limit: int | None = None, config: Any = None):
        """`config` (a TrainConfig): its fingerprint is saved with every checkpoint and checked on `load()`."""
        self.dir = Path(checkpoint_dir)
        self.save_total_limit = save_total_limit if save_total_limit and save_total_limit > 0 else None
        self.fingerprint = config_fingerprint(config) if config is not None else None
        self._verified: set[Path] = set()  # hashed by latest(): load() need not hash them again
        # Test seam: called with a stage name between the steps of a save (crash-injection tests).
        self._stage: Callable[[str], None] = lambda stage: None

    @classmethod
    def from_config(cls, cfg: Any) -> CheckpointManager:
        """`checkpoint_dir` (default `output_dir`), `save_total_limit` and the config fingerprint of a TrainConfig."""
        return cls(cfg.checkpoint_dir or cfg.output_dir, cfg.save_total_limit, config=cfg)

    # ---- saving -------------------------------------------------------------------------------
    def save(self, step: int, tensors: dict[str, torch.Tensor], state: dict[str, Any],
             capture_rng: bool = True) -> Path:
        """Write checkpoint `step` atomically, point `latest` at it, rotate; returns its folder."""
        bad = [n for n in tensors if n.startswith(rng_mod.TENSOR_PREFIX)]
        if bad:
            raise ValueError(f"tensor names starting with {rng_mod.TENSOR_PREFIX!r} are reserved: {bad}")
        all_tensors = owned_host_tensors(tensors)
        full_state: dict[str, Any] = {"step": int(step), "state": state}
        if self.fingerprint is not None:
            full_state["config"] = self.fingerprint
        if capture_rng:
            meta, rng_tensors = rng_mod.capture().to_parts()
            full_state["rng"] = meta
            all_tensors |= rng_tensors
        state_text = json.dumps(full_state, indent=1, allow_nan=True)  # fails early on non-JSON state

        self.dir.mkdir(parents=True, exist_ok=True)
        final = self.dir / f"checkpoint-{step}"
        tmp = self.dir / f"checkpoint-{step}.tmp-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        try:
            save_file(all_tensors, str(tmp / TENSORS_FILE), metadata={"format": FORMAT, "step": str(step)})
            fsync_file(tmp / TENSORS_FILE)
            self._stage("tensors_written")
            (tmp / STATE_FILE).write_text(state_text, encoding="utf-8")
            fsync_file(tmp / STATE_FILE)
            self._stage("state_written")
            files = {n: {"size": (tmp / n).stat().st_size, "sha256": sha256_of(tmp / n)}
                     for n in (TENSORS_FILE, STATE_FILE)}
            manifest = {"format": FORMAT, "version": FORMAT_VERSION, "step": int(step), "files": files}
            (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
            fsync_file(tmp / MANIFEST_FILE)
            fsync_dir(tmp)
            self._stage("manifest_written")
            self._publish(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._stage("renamed")
        write_atomic_text(self.dir / LATEST_FILE, final.name + "\n")
        self._stage("latest_updated")
        self._rotate(keep=final)
        return final

    def _publish(self, tmp: Path, final: Path) -> None:
        publish_dir(tmp, final, self._stage)

    def _rotate(self, keep: Path) -> None:
        """Delete the oldest complete checkpoints beyond `save_total_limit` (never `keep`)."""
        if self.save_total_limit is None:
            return
        complete = [p for p in self._candidates() if self._problem(p, hashes=False) is None]
        excess = len(complete) - self.save_total_limit
        for path in complete[:max(0, excess)]:
            if path == keep:
                continue
            # Rename first: a crash mid-delete leaves a `.del-*` folder, never a half-deleted checkpoint.
            doomed = path.with_name(f"{path.name}.del-{os.getpid()}")
            os.rename(path, doomed)
            self._stage("rotating")
            shutil.rmtree(doomed, ignore_errors=True)

    # ---- finding ------------------------------------------------------------------------------
    def _candidates(self) -> list[Path]:
        """`checkpoint-<step>` folders, oldest first."""
        if not self.dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.dir.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
        return [p for _, p in sorted(found)]

    def clean_stale(self) -> list[Path]:
        """Tidy up after interrupted saves of processes no longer alive; returns what was removed.

        `.tmp-*` (unfinished save) and `.del-*` (rotation victim) folders are removed. An `.old-*` folder
        (a re-save of the same step, moved aside) is renamed back if the crash left no `checkpoint-<step>`.
        """
        removed: list[Path] = []
        if not self.dir.is_dir():
            return removed
        for p in sorted(self.dir.iterdir()):
            m = _TMP.match(p.name)
            pointer_tmp = _LATEST_TMP.match(p.name)
            if pointer_tmp and not pid_alive(int(pointer_tmp.group(1))):
                p.unlink(missing_ok=True)
                removed.append(p)
            if not (m and p.is_dir()) or pid_alive(int(m.group(3))):
                continue
            original = self.dir / f"checkpoint-{m.group(1)}"
            if m.group(2) == "old" and not original.exists():
                os.rename(p, original)
                continue
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
        return removed

    def _problem(self, path: Path, hashes: bool = True) -> str | None:
        """Why `path` is not a complete, intact checkpoint; None when it is."""
        manifest_path = path / MANIFEST_FILE
        if not manifest_path.is_file():
            return f"no {MANIFEST_FILE} (the save did not finish)"
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            return f"{MANIFEST_FILE} is unreadable ({exc})"
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            return f"{MANIFEST_FILE} is not a Surogate checkpoint manifest"
        if manifest.get("version") != FORMAT_VERSION:
            return (f"checkpoint format version {manifest.get('version')!r} is not supported by this Surogate "
                    f"(it reads version {FORMAT_VERSION})")
        for name, info in (manifest.get("files") or {}).items():
            f = path / name
            if not f.is_file():
                return f"{name} is missing"
            if f.stat().st_size != info.get("size"):
                return f"{name} has {f.stat().st_size} bytes, the manifest says {info.get('size')} (truncated or modified)"
            if hashes and sha256_of(f) != info.get("sha256"):
                return f"{name} does not match its sha256 in {MANIFEST_FILE} (corrupted)"
        if set(manifest.get("files") or {}) != {TENSORS_FILE, STATE_FILE}:
            return f"{MANIFEST_FILE} does not list {TENSORS_FILE} and {STATE_FILE}"
        return None

    def latest(self, verify_hashes: bool = True) -> Path | None:
        """The newest complete checkpoint (stale temp folders are removed first), or None if there is none.

        The `latest` pointer is followed when it names a complete checkpoint; otherwise (missing, stale,
        or corrupt target) the folders are scanned, newest first, skipping incomplete or corrupt ones.
        """
        self.clean_stale()
        candidates = self._candidates()
        pointer = self.dir / LATEST_FILE
        if pointer.is_file():
            target = self.dir / pointer.read_text(encoding="utf-8").strip()
            # The pointer is a hint: a newer complete checkpoint (crash between rename and pointer
            # update) still wins.
            if target in candidates and target == candidates[-1] and self._problem(target, verify_hashes) is None:
                self._verified |= {target} if verify_hashes else set()
                return target
        for path in reversed(candidates):
            problem = self._problem(path, verify_hashes)
            if problem is None:
                self._verified |= {path} if verify_hashes else set()
                return path
            log.warning("skipping checkpoint %s: %s", path, problem)
        return None

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints (sizes checked), oldest first."""
        return [p for p in self._candidates() if self._problem(p, hashes=False) is None]

    # ---- loading ------------------------------------------------------------------------------
    def load(self, path: str | os.PathLike) -> Checkpoint:
        """`load()` checked against this manager's config (if it has one); a folder `latest()` just
        hashed is not hashed again (sizes are still checked)."""
        return load(path, self.fingerprint, verify_hashes=Path(path) not in self._verified)


def load(path: str | os.PathLike, expect_config: Any = None, verify_hashes: bool = True) -> Checkpoint:
    """Read and verify one checkpoint folder; UserError naming the folder and the problem otherwise.

    `expect_config`: the current run's TrainConfig (or its `config_fingerprint`); if the checkpoint was
    saved with a different fingerprint, the options that differ are named.
    """
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"checkpoint {path}: no such directory")
    problem = CheckpointManager(path.parent)._problem(path, hashes=verify_hashes)
    if problem:
        raise UserError(f"checkpoint {path} is unusable: {problem}")
    try:
        full = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
        tensors = load_file(str(path / TENSORS_FILE))
    except (OSError, ValueError, SafetensorError) as exc:
        raise UserError(f"checkpoint {path} is unusable: cannot read it ({exc})") from exc
    rng_tensors = {k: tensors.pop(k) for k in [k for k in tensors if k.startswith(rng_mod.TENSOR_PREFIX)]}
    rng_state = (rng_mod.RngState.from_parts(full["rng"], rng_tensors, where=f"checkpoint {path}")
                 if "rng" in full else None)
    state = full.get("state", {})
    if expect_config is not None and "config" in full:
        current = expect_config if is_fingerprint(expect_config) else config_fingerprint(expect_config)
        check_config_compatible(full["config"], current, path)
    return Checkpoint(path, int(full["step"]), tensors, state, rng_state)
