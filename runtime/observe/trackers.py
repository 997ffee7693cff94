"""`report_to`: experiment trackers behind one small interface (wandb, aim); both work offline."""

from __future__ import annotations

import importlib
from types import ModuleType

from surogate.errors import UserError


class Tracker:
    """What the observer needs from a tracker. Metric keys are flat: `train/loss`, `eval/loss`, ..."""

    name = "tracker"
    location: str | None = None  # where the run's files went (printed at the end)

    def log_metrics(self, metrics: dict, step: int) -> None:
        raise NotImplementedError

    def finish(self, summary: dict, status: str = "completed") -> None:
        raise NotImplementedError


def require_extra(module: str, extra: str, option: str = "report_to") -> ModuleType:
    """Import an optional dependency or raise a UserError naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise UserError(
            f"{option}: '{extra}' needs the `{module}` package, which is not installed: "
            f"pip install 'surogate[{extra}]'  ({exc})"
        ) from None


def make_trackers(cfg: object, run_name: str, output_dir: str, config: dict) -> list[Tracker]:
    """Open one tracker per `report_to` entry (unknown names are rejected by the schema already)."""
    from surogate.runtime.observe.naming import report_targets

    trackers: list[Tracker] = []
    try:
        for target in report_targets(cfg):
            if target == "wandb":
                from surogate.runtime.observe.wandb_tracker import WandbTracker

                trackers.append(WandbTracker(cfg, run_name, output_dir, config))
            elif target == "aim":
                from surogate.runtime.observe.aim_tracker import AimTracker

                trackers.append(AimTracker(cfg, run_name, config))
            else:
                raise UserError(f"report_to: unknown target {target!r} (expected 'wandb' or 'aim')")
    except BaseException:
        for t in trackers:  # do not leave a half-opened wandb run behind
            t.finish({}, status="failed")
        raise
    return trackers
