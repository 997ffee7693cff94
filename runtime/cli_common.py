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


def print_result(result: Any) -> int:
    """Print what the run did; returns the command's exit code (128 + the signal's number when a stop signal
    ended it: SIGTERM 143, SIGINT 130; else 0)."""
    from surogate.runtime.stop_signals import exit_code

    print(f"trained {result.steps} step(s)" + (f"; stopped: {result.stopped}" if result.stopped else ""))
    for kind, path in result.outputs.items():
        print(f"  {kind}: {path}")
    signum = getattr(result, "signal", None)
    if not signum:
        return 0
    print(f"interrupted at step {result.steps}, checkpoint saved; run the same command again to continue "
          "(resume_from_checkpoint: true, the default)")
    return exit_code(signum)
