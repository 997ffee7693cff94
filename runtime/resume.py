"""Before a run trains: whether its checkpoint folder can take it, and the checkpoint it continues from.

A run that does not resume refuses a folder holding checkpoints (two runs would mix); a run that resumes
restores the newest good checkpoint and refuses folders none of whose checkpoints is usable.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from surogate.errors import UserError
from surogate.runtime.checkpoint_config import ConfigMismatchError
from surogate.runtime.run_identity import KEY as IDENTITY
from surogate.runtime.run_identity import check_moved, check_same_identity

if TYPE_CHECKING:
    from surogate.runtime.trainer import Trainer


def _agreed(check: Callable[[], None]) -> None:
    """Run `check` (raises UserError) on rank 0 only; then every rank raises its message: rank 0 looks at the
    shared folder, the others agree (one broadcast)."""
    from surogate.runtime.distributed import comm

    problem = None
    if comm.rank() == 0:
        try:
            check()
        except UserError as exc:
            problem = str(exc)
    problem = comm.broadcast(problem)
    if problem:
        raise UserError(problem)


def earlier_exports(cfg: Any) -> list[Path]:
    """The exported models (adapter/, merged/, model/) an earlier run left in `output_dir` (empty folders aside)."""
    from surogate.runtime.run_exports import EXPORT_FOLDERS

    out = Path(cfg.output_dir)
    found = []
    for name in EXPORT_FOLDERS:
        folder = out / name
        if folder.is_dir():
            if any(folder.iterdir()):
                found.append(folder)
        elif folder.exists():
            found.append(folder)
    return found


def fresh_start_advice(cfg: Any, manager: Any) -> str:
    """How to start a new run where an earlier run's checkpoints or exported models are in the way; each way
    works: the guards below accept it."""
    # a checkpoint_dir set apart from output_dir must change too when it holds the earlier run's checkpoints
    other = ("another output_dir and another checkpoint_dir" if cfg.checkpoint_dir and manager.folders()
             else "another output_dir")
    doomed = ([f"{manager.dir}/checkpoint-*"] if manager.folders() else []) + [str(p) for p in earlier_exports(cfg)]
    remove = f", or remove the earlier run's {' and '.join(_kinds(manager, cfg))} (rm -r {' '.join(doomed)})" if doomed \
        else ""
    return f"give it {other}{remove}"


def _kinds(manager: Any, cfg: Any) -> list[str]:
    return [k for k, there in (("checkpoints", manager.folders()), ("exported models", earlier_exports(cfg))) if there]


def _refuse_replacing_exports(cfg: Any, manager: Any) -> None:
    """UserError when a run that starts fresh (it does not resume, or there is nothing to resume) would replace
    the models an earlier run exported into output_dir when it ends: refused now, not found lost then. A run
    that resumes rewrites its own line's exports."""
    found = earlier_exports(cfg)
    if not found:
        return
    if cfg.resume_from_checkpoint and manager.folders():
        _refuse_another_lines_exports(cfg, manager, found)
        return
    why = ("resume_from_checkpoint is false" if not cfg.resume_from_checkpoint
           else f"there is no checkpoint in {manager.dir} to resume")
    names = ", ".join(p.name + ("/" if p.is_dir() else "") for p in found)
    raise UserError(
        f"output_dir: {Path(cfg.output_dir)} already holds {names} exported by an earlier run, and this run starts "
        f"fresh ({why}): it would replace {'them' if len(found) > 1 else 'it'} when it ends. To keep "
        f"{'them' if len(found) > 1 else 'it'}, {fresh_start_advice(cfg, manager)}; or resume the run that "
        "exported them, with its config and checkpoint_dir")


def _refuse_another_lines_exports(cfg: Any, manager: Any, found: list[Path]) -> None:
    """UserError when a run that resumes would replace models exported by another run: the exports record the
    checkpoint line that wrote them (runtime/run_exports.py), and this run continues the line in its checkpoint
    folder (a checkpoint_dir set apart from a shared output_dir). Exports or checkpoints from before the record
    existed are let through, as before."""
    from surogate.runtime.run_exports import exported_by

    line = manager.known_line()
    marks = exported_by(cfg.output_dir)
    foreign = [p for p in found if line and marks.get(p.name) not in (None, line)]
    if not foreign:
        return
    names = ", ".join(p.name + "/" for p in foreign)
    them = "them" if len(foreign) > 1 else "it"
    raise UserError(
        f"output_dir: {Path(cfg.output_dir)} holds {names} exported by another run than the one this run resumes "
        f"(its checkpoints are in {manager.dir}): it would replace {them} when it ends. To keep {them}, give this "
        f"run another output_dir, or remove {them} (rm -r {' '.join(str(p) for p in foreign)})")


def _check_checkpoint_dir(cfg: Any) -> None:
    """UserError when the checkpoint folder cannot take this run: not a writable folder, or (a run that does not
    resume) it holds another run's checkpoints, or a run that starts fresh would replace an earlier run's exported
    model. Cheap: nothing is hashed."""
    from surogate.runtime.checkpoint import CheckpointManager

    manager = CheckpointManager.from_config(cfg)
    manager.check_writable()
    if not cfg.resume_from_checkpoint:
        manager.refuse_foreign(fresh_start_advice(cfg, manager))
    manager.clean_stale()
    _refuse_replacing_exports(cfg, manager)


def guard_checkpoint_dir(cfg: Any) -> None:
    """UserError (every rank) when the checkpoint folder cannot take this run."""
    _agreed(lambda: _check_checkpoint_dir(cfg))


def _refuse_going_back(step: int, latest: Path, trainer: Trainer, cfg: Any, checkpoints: Any) -> None:
    """UserError when the checkpoint to resume is past the run's end (max_steps or num_epochs lowered below its
    step): its model is not the shorter run asked for, and a run cannot go back."""
    total = trainer.total_steps
    if step <= total:
        return
    why = (f"max_steps: {int(cfg.max_steps)}" if int(cfg.max_steps) > 0
           else f"num_epochs makes the run {total} steps ({trainer.steps_per_epoch} per epoch)")
    raise UserError(
        f"{why}, but the checkpoint to resume, {latest}, is at step {step}: a run cannot go back to step {total}, and "
        f"its model is not the {total}-step run asked for. To keep {latest.name}'s model as it is, set max_steps: "
        f"{step} (higher to train on); to train a {total}-step run, start a new run: "
        f"{fresh_start_advice(cfg, checkpoints)}")


def _length_note(loaded: Any, trainer: Trainer, cfg: Any) -> str | None:
    """A note when the run's length changed since the checkpoint was saved (max_steps or num_epochs): the LR schedule
    (and warmup_ratio's warmup) spans the new length from the resumed step on, which the LR it trains with next shows."""
    from surogate.runtime.lr_schedule import lr_at

    if "total_steps" not in loaded.state:
        return None
    before, now, step = loaded.fields().integer("total_steps", low=1), trainer.total_steps, trainer.step
    if before == now:
        return None
    if step >= now:  # (a step past the end is refused: `_refuse_going_back`)
        return (f"resume: the run is now {now} steps and {loaded.path.name} ends it, but it was saved in a run of "
                f"{before}: its model is exported as trained, under that run's {cfg.lr_scheduler_type} LR schedule "
                f"(which had not reached its end at step {step})") if before > now else None
    will = lr_at(step, now, cfg) * trainer.lr_scale
    was = (f"{lr_at(step, before, cfg) * trainer.lr_scale:.3g} in the {before}-step run" if step < before
           else f"past the end of the {before}-step run's schedule")
    return (f"resume: the run is now {now} steps ({loaded.path.name} was saved in a run of {before}): the "
            f"{cfg.lr_scheduler_type} LR schedule spans {now} steps from here; step {step + 1} trains with LR {will:.3g} "
            f"({was})")


def resume_latest(trainer: Trainer, checkpoints: Any, cfg: Any) -> tuple[Path | None, list[str]]:
    """Restore the newest good checkpoint when `resume_from_checkpoint`; returns it and notes on the ones skipped.

    Checkpoint folders none of which is usable stop the run (UserError): starting from step 0 beside them
    would mix two runs, and the user asked to continue."""
    from surogate.runtime.distributed.state import find_latest

    if not cfg.resume_from_checkpoint:
        return None, []
    latest = find_latest(checkpoints)
    if latest is None:
        _agreed(lambda: checkpoints.refuse_unusable(fresh_start_advice(cfg, checkpoints)))
        return None, []
    moved_note = None
    try:
        loaded = checkpoints.load(latest, allow_moved=trainer.identity is not None)
        if trainer.identity is not None:
            check_same_identity(loaded.state.get(IDENTITY), trainer.identity, latest)
            moved_note = (check_moved(loaded.state.get(IDENTITY), trainer.identity, loaded.moved, latest)
                          if loaded.moved else None)
    except ConfigMismatchError as exc:
        raise UserError(f"{exc}; to start a new run with this config instead, {fresh_start_advice(cfg, checkpoints)}"
                        ) from None
    _refuse_going_back(loaded.step, latest, trainer, cfg, checkpoints)
    trainer.restore(loaded)
    length = _length_note(loaded, trainer, cfg)
    notes = [f"resume: skipped {path.name} ({why}); resumed from {latest.name}. {path.name} is left in place and "
             "not counted by save_total_limit (saving that step again replaces it)"
             for path, why in sorted(checkpoints.bad.items())]
    if moved_note:
        notes.append(moved_note)
    if loaded.config_changes:
        notes.append(f"resume: memory and speed options changed since {latest.name} ({'; '.join(loaded.config_changes)})"
                     ": the same training, another memory plan (results may differ in the last bits)")
    return latest, notes + trainer.restore_notes + ([length] if length else [])
