"""Atomic, rotated, resumable training checkpoints.

Layout of one checkpoint (`<checkpoint_dir>/checkpoint-<step>/`):
    tensors.safetensors   weights, optimizer tensors, torch RNG states (`__rng__.*`, uint8)
    state.json            JSON-able training state (optimizer scalars, LR schedule, data position, ...),
                          the Python/NumPy RNG words and the step
    manifest.json         written last: format version, step, size and sha256 of every other file, a
                          random `id`, and `previous`: the `id` of the checkpoint the `latest` pointer
                          named when this save began (None without one), and `run`: the line's id
                          (`line_id`), which the models the run exports carry too

A save writes into `checkpoint-<step>.tmp-<pid>/`, fsyncs every file and the folder, renames it to
`checkpoint-<step>/`, fsyncs the parent, then replaces the `latest` pointer file atomically, then
rotates. A crash at any moment leaves either the previous state or the new one: a `.tmp-*` folder
(ignored and later removed) or a complete, verifiable checkpoint. `latest()` trusts only manifests.

One folder holds one run's line of checkpoints. A fresh run refuses a folder that already holds
checkpoints (`refuse_foreign`), and rotation and `latest()` do not rely on that alone:
- `latest()` follows the pointer; a newer checkpoint wins over it only when its manifest's `previous`
  is the pointer target's `id` (the save that crashed between its rename and the pointer update), so
  checkpoints of another line with higher step numbers are not taken for this run's.
- rotation counts only this line's good checkpoints: none newer than the one just written (those are not
  this run's), none that `latest()` found corrupt when the run resumed (a checkpoint known to be bad
  must never be kept in place of a good one). Rotation deletes neither kind: they are reported, and are
  the user's to inspect or remove (a corrupt one is replaced when the run saves that step again).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from surogate.errors import RunFailedError, UserError
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
from surogate.runtime.checkpoint_config import (
    MovedPathsError,
    check_config_compatible,
    config_fingerprint,
    is_fingerprint,
)
from surogate.runtime.checkpoint_fields import STATE_FILE, StateFields

log = logging.getLogger(__name__)

FORMAT = "surogate-checkpoint"
FORMAT_VERSION = 1
TENSORS_FILE = "tensors.safetensors"
MANIFEST_FILE = "manifest.json"
LATEST_FILE = "latest"
_NAME = re.compile(r"^checkpoint-(\d+)$")
_TMP = re.compile(r"^checkpoint-(\d+)\.(tmp|old|del)-(\d+)$")
_NEWER = "written by a newer Surogate"
_LATEST_TMP = re.compile(r"^\.latest\.tmp-(\d+)$")


@dataclass
class Checkpoint:
    """What `load()` returns."""

    path: Path
    step: int
    tensors: dict[str, torch.Tensor]
    state: dict[str, Any]
    rng: rng_mod.RngState | None
    # memory and speed options the resuming run changed (`name: old -> new`: checkpoint_config._PLACEMENT_FREE)
    config_changes: list[str] = field(default_factory=list)
    moved: list[str] = field(default_factory=list)  # options naming files by path that differ (`allow_moved`)

    def restore_rng(self) -> None:
        """Put the Python/NumPy/torch generators back to their state at save time."""
        if self.rng is None:
            raise UserError(f"{self.path}: this checkpoint was saved without random-generator state")
        try:
            rng_mod.restore(self.rng)
        except (TypeError, ValueError, IndexError, OverflowError, RuntimeError) as exc:
            raise StateFields(self.path).error("rng", "the generator states the save wrote", None,
                                               found=f"one that does not restore ({exc})") from None

    def fields(self, prefix: str = "state") -> StateFields:
        """Checked reads of this checkpoint's training state (`state` of its state.json)."""
        return StateFields(self.path, self.state, prefix)


class CheckpointManager:
    """Saves, rotates, finds and loads checkpoints in one folder."""

    def __init__(self, checkpoint_dir: str | os.PathLike, save_total_limit: int | None = None, config: Any = None,
                 field: str = "checkpoint_dir"):
        """`config` (a TrainConfig): its fingerprint is saved with every checkpoint and checked on `load()`.
        `field`: the config option that chose the folder, for error messages."""
        self.dir = Path(checkpoint_dir)
        self.field = field
        self.save_total_limit = save_total_limit if save_total_limit and save_total_limit > 0 else None
        self.fingerprint = config_fingerprint(config) if config is not None else None
        self._verified: set[Path] = set()  # hashed by latest(): load() need not hash them again
        self.bad: dict[Path, str] = {}  # checkpoints latest() skipped, with the reason: never kept by rotation
        self._line: str | None = None  # `line_id`, once asked
        # Test seam: called with a stage name between the steps of a save (crash-injection tests).
        self._stage: Callable[[str], None] = lambda stage: None

    @classmethod
    def from_config(cls, cfg: Any) -> CheckpointManager:
        """`checkpoint_dir` (default `output_dir`), `save_total_limit` and the config fingerprint of a TrainConfig."""
        field = "checkpoint_dir" if cfg.checkpoint_dir else "output_dir"
        return cls(cfg.checkpoint_dir or cfg.output_dir, cfg.save_total_limit, config=cfg, field=field)

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
            manifest = {"format": FORMAT, "version": FORMAT_VERSION, "step": int(step), "files": files,
                        "id": uuid.uuid4().hex, "previous": self._pointer_id(), "run": self.line_id()}
            (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
            fsync_file(tmp / MANIFEST_FILE)
            fsync_dir(tmp)
            self._stage("manifest_written")
            self._publish(tmp, final)
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(exc, OSError):  # a full disk, a folder gone or read-only: say so, keep what is saved
                raise self._unsaved(final, exc) from None
            raise
        self._stage("renamed")
        try:
            write_atomic_text(self.dir / LATEST_FILE, final.name + "\n")
        except OSError as exc:  # changed under a running run (`check_pointer` refuses it up front)
            for tmp_pointer in self.dir.glob(f".{LATEST_FILE}.tmp-{os.getpid()}"):
                tmp_pointer.unlink(missing_ok=True)
            raise UserError(f"{self.field}: {final} was saved, but its pointer {self.dir / LATEST_FILE} could not be "
                            f"updated ({exc.strerror or exc}): move that away and run the same command again, which "
                            f"resumes from {final.name}") from None
        self._stage("latest_updated")
        self._rotate(keep=final)
        return final

    def _unsaved(self, final: Path, exc: OSError) -> RunFailedError:
        """The error that stops a run whose checkpoint `final` could not be written (its partial folder removed):
        the cause, and what the same command will resume from."""
        last = self._pointer_name()
        then = (f"the last checkpoint is {self.dir / last}: fix that and run the same command again to resume from "
                "it" if last and (self.dir / last).is_dir() else
                "no checkpoint was saved before it: fix that and run the same command again to start over")
        return RunFailedError(f"{self.field}: could not save {final.name} in {self.dir} "
                              f"({exc.strerror or exc}); the run stops here, {then}")

    def _publish(self, tmp: Path, final: Path) -> None:
        publish_dir(tmp, final, self._stage)

    def _rotate(self, keep: Path) -> None:
        """Delete this line's oldest good checkpoints beyond `save_total_limit` (never `keep`).

        Counted are the complete checkpoints up to `keep`'s step that `latest()` did not find corrupt: a newer
        one is not this run's (rotation by step number would delete this run's own, as if it were older), a
        known-bad one must not take a good one's place. Neither kind is deleted (see the module docstring).
        """
        if self.save_total_limit is None:
            return
        keep_step = step_of(keep)
        pool = [p for p in self.checkpoints() if step_of(p) <= keep_step and p not in self.bad]
        excess = len(pool) - self.save_total_limit
        for path in pool[:max(0, excess)]:
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
            version = manifest.get("version")
            newer = isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION
            return (f"checkpoint format version {version!r} is not supported by this Surogate (it reads version "
                    f"{FORMAT_VERSION}{'; ' + _NEWER if newer else ''})")
        listed = manifest.get("files")
        if not isinstance(listed, dict) or not all(isinstance(info, dict) for info in listed.values()):
            return f"{MANIFEST_FILE}: files is not an object of {{name: {{size, sha256}}}} (edited or damaged)"
        for name, info in listed.items():
            f = path / name
            if not f.is_file():
                return f"{name} is missing"
            if f.stat().st_size != info.get("size"):
                return f"{name} has {f.stat().st_size} bytes, the manifest says {info.get('size')} (truncated or modified)"
            if hashes and sha256_of(f) != info.get("sha256"):
                return f"{name} does not match its sha256 in {MANIFEST_FILE} (corrupted)"
        if set(listed) != {TENSORS_FILE, STATE_FILE}:
            return f"{MANIFEST_FILE} does not list {TENSORS_FILE} and {STATE_FILE}"
        return None

    def latest(self, verify_hashes: bool = True) -> Path | None:
        """The newest complete checkpoint of this folder's line (stale temp folders are removed first), or None.

        The `latest` pointer is followed when it names a complete checkpoint, and then past it to a newer
        checkpoint whose manifest says it was written right after it (a crash between a save's rename and
        its pointer update). Otherwise (no pointer, stale or corrupt target) the folders are scanned, newest
        first, skipping incomplete or corrupt ones (recorded in `bad`, with a warning).
        """
        self.clean_stale()
        candidates = self._candidates()
        target = self.dir / (self._pointer_name() or "-")
        if target in candidates and self._good(target, verify_hashes):
            return self._successor(target, candidates, verify_hashes)
        for path in reversed(candidates):
            if self._good(path, verify_hashes):
                return path
        return None

    def _good(self, path: Path, verify_hashes: bool) -> bool:
        """Whether `path` is complete and intact; a bad one is recorded in `bad` and warned about."""
        problem = self._problem(path, verify_hashes)
        if problem is None:
            self._verified |= {path} if verify_hashes else set()
            return True
        if path not in self.bad:
            log.warning("skipping checkpoint %s: %s", path, problem)
        self.bad[path] = problem
        return False

    def _successor(self, target: Path, candidates: list[Path], verify_hashes: bool) -> Path:
        """`target`, or the newest good checkpoint saved after it in the same line (`previous` -> `id` chain).

        Checkpoints written before manifests had `id` / `previous` keep the old rule: the newest complete wins.
        """
        newer = [p for p in candidates if step_of(p) > step_of(target)]
        if "id" not in self._manifest(target) or any("previous" not in self._manifest(p) for p in newer):
            return next((p for p in reversed(newer) if self._good(p, verify_hashes)), target)
        current = target
        for path in newer:
            if (self._manifest(path)["previous"] == self._manifest(current)["id"]
                    and self._good(path, verify_hashes)):
                current = path
        return current

    def _manifest(self, path: Path) -> dict:
        """A checkpoint's manifest, or {} when it is missing or unreadable."""
        try:
            manifest = json.loads((path / MANIFEST_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return manifest if isinstance(manifest, dict) else {}

    def line_id(self) -> str:
        """The id of this folder's line of checkpoints, saved in every manifest (`run`) and with the models a run
        exports (runtime/run_exports.py): the line the `latest` pointer names (a resumed run continues it), else
        a new one, chosen once."""
        if self._line is None:
            self._line = self.known_line() or uuid.uuid4().hex
        return self._line

    def known_line(self) -> str | None:
        """The `run` of the checkpoint the `latest` pointer names, or None (no pointer; a checkpoint saved before
        manifests had it)."""
        name = self._pointer_name()
        run = self._manifest(self.dir / name).get("run") if name else None
        return run if isinstance(run, str) and run else None

    def _pointer_id(self) -> str | None:
        """The manifest `id` of the checkpoint the `latest` pointer names, or None."""
        name = self._pointer_name()
        return self._manifest(self.dir / name).get("id") if name else None

    def _pointer_name(self) -> str | None:
        """The folder name the `latest` pointer holds, or None without a readable pointer."""
        try:
            return (self.dir / LATEST_FILE).read_text(encoding="utf-8").strip() or None
        except (OSError, UnicodeDecodeError):
            return None

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints (sizes checked), oldest first."""
        return [p for p in self._candidates() if self._problem(p, hashes=False) is None]

    def folders(self) -> list[Path]:
        """Every `checkpoint-<step>` folder, complete or not, oldest first."""
        return self._candidates()

    # ---- guarding the folder before a run ------------------------------------------------------
    def check_writable(self) -> None:
        """UserError naming the folder's option unless the checkpoint folder exists (or can be made) and is writable.

        Run before training: otherwise the first save, steps later, fails and those steps are lost.
        """
        probe = self.dir / f".surogate-write-check-{os.getpid()}"
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()
        except (FileExistsError, NotADirectoryError) as exc:
            raise UserError(f"{self.field}: {self.dir} cannot hold checkpoints: {_where_a_file_is(self.dir)} is a file, "
                            f"not a folder ({exc.strerror}); choose another {self.field}") from None
        except OSError as exc:
            raise UserError(f"{self.field}: cannot write checkpoints into {self.dir} ({exc.strerror or exc}); choose a "
                            f"writable {self.field} or fix its permissions") from None
        self.check_pointer()

    def check_pointer(self) -> None:
        """UserError when `latest` is there but not a file (a folder, a FIFO, a link to one): every save would fail
        to update it, and reading a FIFO blocks. A dangling link or unreadable contents are fine (a save replaces
        it; `latest()` then scans the folders)."""
        pointer = self.dir / LATEST_FILE
        if pointer.exists() and not pointer.is_file():
            kind = "a folder" if pointer.is_dir() else "not a regular file"
            raise UserError(f"{self.field}: {pointer} is {kind}, but Surogate keeps its pointer to the newest checkpoint "
                            f"in a file of that name: saves could not update it. Move it away or remove it "
                            f"(rm -r {pointer}); no checkpoint is lost (resuming finds the newest without it)")

    def _fresh_start(self) -> str:
        """How to start a new run beside this folder's checkpoints, knowing only the folder (the session's guard
        passes advice that also counts the run's other outputs, `runtime.resume.fresh_start_advice`)."""
        return f"choose another {self.field}, or remove them (rm -r {self.dir}/checkpoint-*)"

    def refuse_foreign(self, fresh_start: str | None = None) -> None:
        """UserError when a run that does not resume would write into a folder holding checkpoints already.

        Its saves would mix with them: rotation would count them, a later resume could pick theirs.
        Nothing is deleted: the user resumes them, points the run elsewhere, or removes them. `fresh_start`: how
        to start the new run instead (every way it names must work).
        """
        self.clean_stale()
        found = self.folders()
        if not found:
            return
        names = ", ".join(p.name for p in found[:6]) + (f" and {len(found) - 6} more" if len(found) > 6 else "")
        raise UserError(
            f"{self.field}: {self.dir} already holds checkpoints of an earlier run ({names}), and "
            "resume_from_checkpoint is false: a fresh run would mix its checkpoints with them. Either resume them "
            f"(resume_from_checkpoint: true, with that run's config), or, to start a new run, "
            f"{fresh_start or self._fresh_start()}")

    def refuse_unusable(self, fresh_start: str | None = None) -> None:
        """UserError when resuming found checkpoint folders but none usable (after `latest()` returned None).

        Starting from step 0 beside them would mix two runs, and the user asked to resume: say what is wrong.
        """
        found = self.folders()
        if not found:
            return
        problems = {p: self.bad.get(p) or self._problem(p) or "unusable" for p in found}
        why = "; ".join(f"{p.name}: {problems[p]}" for p in found[-4:])
        newer = all(_NEWER in problem for problem in problems.values())
        raise UserError(
            f"{self.field}: resume_from_checkpoint is true but none of the {len(found)} checkpoint(s) in {self.dir} is "
            f"usable ({why}). " + ("They were written by a newer Surogate: resume them with it (or upgrade this one)"
                                   if newer else "Restore them from a copy")
            + f", or, to start afresh, {fresh_start or self._fresh_start()}")

    # ---- loading ------------------------------------------------------------------------------
    def load(self, path: str | os.PathLike, allow_moved: bool = False) -> Checkpoint:
        """`load()` checked against this manager's config (if it has one); a folder `latest()` just
        hashed is not hashed again (sizes are still checked)."""
        return load(path, self.fingerprint, verify_hashes=Path(path) not in self._verified, allow_moved=allow_moved)


def step_of(path: str | os.PathLike) -> int:
    """The step number of a `checkpoint-<step>` folder."""
    return int(Path(path).name.rsplit("-", 1)[1])


def _where_a_file_is(path: Path) -> Path:
    """`path` or the first of its parents that exists as something other than a folder."""
    for p in [*reversed(path.parents), path]:
        if p.exists() and not p.is_dir():
            return p
    return path


def load(path: str | os.PathLike, expect_config: Any = None, verify_hashes: bool = True,
         allow_moved: bool = False) -> Checkpoint:
    """Read and verify one checkpoint folder; UserError naming the folder and the problem otherwise.

    `expect_config`: the current run's TrainConfig (or its `config_fingerprint`); if the checkpoint was
    saved with a different fingerprint, the options that differ are named. `allow_moved`: options that name files
    by path may differ (`Checkpoint.moved` lists them; the caller must compare the content: run_identity.py).
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
    top = StateFields(path, full)
    if not isinstance(full, dict):
        raise top.error("(the document)", "a JSON object", full)
    step = top.integer("step")
    state = top.mapping("state").doc
    rng_tensors = {k: tensors.pop(k) for k in [k for k in tensors if k.startswith(rng_mod.TENSOR_PREFIX)]}
    rng_state = (rng_mod.RngState.from_parts(top.mapping("rng").doc, rng_tensors, where=f"{path / STATE_FILE}: rng")
                 if "rng" in full else None)
    changes: list[str] = []  # memory and speed options this run changed (checkpoint_config._PLACEMENT_FREE)
    moved: list[str] = []  # options naming files that now name other paths (checkpoint_config.MOVABLE)
    if expect_config is not None and "config" in full:
        saved = top.mapping("config")
        if not is_fingerprint(saved.doc) or not isinstance(saved.doc["hash"], str) \
                or not isinstance(saved.doc["options"], dict):
            raise top.error("config", "the config fingerprint the save wrote ({\"hash\": ..., \"options\": {...}})",
                            saved.doc)
        current = expect_config if is_fingerprint(expect_config) else config_fingerprint(expect_config)
        try:
            changes = check_config_compatible(saved.doc, current, path)
        except MovedPathsError as exc:
            if not allow_moved:
                raise
            changes, moved = exc.changes, exc.moved
    return Checkpoint(path, step, tensors, state, rng_state, changes, moved)
