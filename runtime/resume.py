"""Before a run trains: whether its checkpoint folder can take it, and the checkpoint it continues from.

A run that does not resume refuses a folder holding checkpoints (two runs would mix); a run that resumes
restores the newest good checkpoint and refuses folders none of whose checkpoints is usable.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from surogate.errors import UserError

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


def _check_checkpoint_dir(cfg: Any) -> None:
    """UserError when the checkpoint folder cannot take this run: not a writable folder, or (a run that does not
    resume) it holds another run's checkpoints. Cheap: nothing is hashed."""
    from surogate.runtime.checkpoint import CheckpointManager

    manager = CheckpointManager.from_config(cfg)
    manager.check_writable()
    if not cfg.resume_from_checkpoint:
        manager.refuse_foreign()


def guard_checkpoint_dir(cfg: Any) -> None:
    """UserError (every rank) when the checkpoint folder cannot take this run."""
    _agreed(lambda: _check_checkpoint_dir(cfg))


def resume_latest(trainer: Trainer, checkpoints: Any, cfg: Any) -> tuple[Path | None, list[str]]:
    """Restore the newest good checkpoint when `resume_from_checkpoint`; returns it and notes on the ones skipped.

    Checkpoint folders none of which is usable stop the run (UserError): starting from step 0 beside them
    would mix two runs, and the user asked to continue."""
    from surogate.runtime.distributed.state import find_latest

    if not cfg.resume_from_checkpoint:
        return None, []
    latest = find_latest(checkpoints)
    if latest is None:
        _agreed(checkpoints.refuse_unusable)
        return None, []
    trainer.restore(checkpoints.load(latest))
    notes = [f"resume: skipped {path.name} ({why}); resumed from {latest.name}. {path.name} is left in place and "
             "not counted by save_total_limit (saving that step again replaces it)"
             for path, why in sorted(checkpoints.bad.items())]
    return latest, notes + trainer.restore_notes
