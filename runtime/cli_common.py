"""Shared pieces of the training commands (`sft`, `pt`, `run`)."""

from __future__ import annotations

import argparse
from typing import Any

from surogate.errors import ConfigError


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", metavar="CONFIG", help="YAML config file")
    parser.add_argument("--max-steps", type=int, default=None, help="override `max_steps` (quick trials)")


def load_with_overrides(path: str, max_steps: int | None) -> Any:
    """Load a config; command-line overrides go through the same validation as the file."""
    from surogate.schema import config_from_dict, load_config

    cfg = load_config(path, warn=True)
    if max_steps is None:
        return cfg
    data = cfg.to_dict()
    data["max_steps"] = max_steps
    try:
        return config_from_dict(data, source=path)
    except ConfigError as exc:
        raise ConfigError([i for i in exc.issues]) from None


RUN_FAILED = 1  # the exit code of a run that started but failed (diverged); bad input is 2 (UserError)


def steps_line(result: Any) -> str:
    """What the run trained, truthfully: the steps applied in this run, those skipped, where a resumed run began."""
    first = int(getattr(result, "first_step", 0) or 0)
    skipped = list(getattr(result, "skipped", None) or [])
    ran = result.steps - first
    line = f"trained {ran - len(skipped)} step(s)"
    if skipped:
        shown = ", ".join(str(s) for s in skipped[:8]) + (f" and {len(skipped) - 8} more" if len(skipped) > 8 else "")
        line += f" of {ran}; skipped {len(skipped)} with a non-finite loss or gradients (step(s) {shown})"
    if first:
        line += f" (resumed at step {first}; now at step {result.steps})" if ran else f" (resumed at step {first})"
    return line


def print_result(result: Any) -> int:
    """Print what the run did; returns the command's exit code (128 + the signal's number when a stop signal
    ended it: SIGTERM 143, SIGINT 130; RUN_FAILED when the run failed, with its reason on stderr; else 0)."""
    import sys

    from surogate.runtime.stop_signals import exit_code

    failed = getattr(result, "failed", None)
    print(steps_line(result) + (f"; stopped: {result.stopped}" if result.stopped and not failed else ""))
    for kind, path in result.outputs.items():
        print(f"  {kind}: {path}")
    if failed:
        print(f"error: the run failed: {failed}", file=sys.stderr)
        return RUN_FAILED
    signum = getattr(result, "signal", None)
    if not signum:
        return 0
    print(f"interrupted at step {result.steps}, checkpoint saved; run the same command again to continue "
          "(resume_from_checkpoint: true, the default)")
    return exit_code(signum)
