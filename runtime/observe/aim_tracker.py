"""Aim tracker (`report_to: aim`): a run in a local repository (`aim_repo`, default: aim's own)."""

from __future__ import annotations

from surogate.runtime.observe.trackers import Tracker, require_extra


class AimTracker(Tracker):
    """Config as `run["hparams"]`; metrics tracked with context `{"subset": "train"|"eval"}`;
    the final summary (artefact paths under "outputs") as `run["summary"]`."""

    name = "aim"

    def __init__(self, cfg: object, run_name: str, config: dict):
        aim = require_extra("aim", "aim")
        self._aim = aim
        # aim's own system sampler and stdout capture are off: GPU figures come from `log_gpu_util`, and
        # the capture would fight the live progress line for the terminal
        self.run = aim.Run(
            repo=getattr(cfg, "aim_repo", None),
            experiment=getattr(cfg, "aim_experiment", None),
            system_tracking_interval=None,
            capture_terminal_logs=False,
        )
        self.run.name = getattr(cfg, "aim_name", None) or run_name
        self.run["hparams"] = config
        self.location = str(getattr(self.run.repo, "path", "") or "") or None

    def log_metrics(self, metrics: dict, step: int) -> None:
        for key, value in metrics.items():
            subset, _, name = key.partition("/")
            if not name:
                subset, name = "train", key
            if isinstance(value, (int, float)):
                self.run.track(float(value), name=name, step=step, context={"subset": subset})

    def finish(self, summary: dict, status: str = "completed") -> None:
        self.run["summary"] = summary
        self.run["status"] = status
        run_hash, repo = self.run.hash, self.run.repo
        self.run.close()
        _index(repo, run_hash)


def _index(repo: object, run_hash: str) -> None:
    """Make the finished run visible to `aim.Repo(...).iter_runs()` right away.

    Aim writes each run to its own chunk and only merges it into the repo index from `aim up` /
    `aim runs`; indexing here saves users a confusing empty query. Best effort: internal aim API.
    """
    try:
        from aim.sdk.index_manager import RepoIndexManager

        RepoIndexManager(repo).index(run_hash)
    except Exception:
        pass
