"""Weights & Biases tracker (`report_to: wandb`)."""

from __future__ import annotations

import netrc
import os

from surogate.runtime.observe.trackers import Tracker, require_extra


def _has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        hosts = netrc.netrc().hosts
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return any("wandb" in h for h in hosts)


def wandb_mode() -> str:
    """`WANDB_MODE` when set; otherwise online with credentials, offline without (never a login prompt)."""
    mode = os.environ.get("WANDB_MODE")
    if mode:
        return mode
    return "online" if _has_wandb_credentials() else "offline"


class WandbTracker(Tracker):
    """One wandb run: config at init, `log` per step (eval merged into the same step), summary at finish.

    Files go under `<output_dir>/wandb/`; offline runs can be uploaded later with `wandb sync <dir>`.
    """

    name = "wandb"

    def __init__(self, cfg: object, run_name: str, output_dir: str, config: dict):
        wandb = require_extra("wandb", "wandb")
        self.mode = wandb_mode()
        os.makedirs(output_dir, exist_ok=True)
        self.run = wandb.init(
            project=getattr(cfg, "wandb_project", None) or "surogate",
            name=getattr(cfg, "wandb_name", None) or run_name,
            config=config,
            dir=output_dir,
            mode=self.mode,
        )
        self.location = getattr(self.run, "dir", None)
        if self.location:
            self.location = os.path.dirname(self.location)  # the run folder, not its files/ subfolder

    def log_metrics(self, metrics: dict, step: int) -> None:
        self.run.log(metrics, step=step)

    def finish(self, summary: dict, status: str = "completed") -> None:
        for key, value in summary.items():
            self.run.summary[key] = value
        self.run.finish(exit_code=0 if status == "completed" else 1)
