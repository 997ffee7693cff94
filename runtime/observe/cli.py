"""`surogate plot LOG_FILE [-o out.png]`: redraw the loss plot from a JSONL training log."""

from __future__ import annotations

import argparse
import sys

from surogate.errors import UserError
from surogate.runtime.observe.history import LossHistory
from surogate.runtime.observe.jsonl import read_log
from surogate.runtime.observe.plot import plot_training_loss

SHOWN = 10  # unreadable lines named one by one; the rest are counted


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("log_file", metavar="LOG_FILE", help="JSONL training log written by `log_file`")
    parser.add_argument("-o", "--output", default="training_loss.png", help="image to write (PNG)")


def run(args: argparse.Namespace) -> int:
    """Plot every good record; each line that is not one (a torn write, a hand edit) is named on stderr and left
    out. Exit 2 when nothing is left to plot."""
    data = read_log(args.log_file, skip_bad=True)
    for problem in data.skipped[:SHOWN]:
        print(f"warning: {problem}; line skipped", file=sys.stderr)
    if len(data.skipped) > SHOWN:
        print(f"warning: {len(data.skipped) - SHOWN} more unreadable line(s) skipped", file=sys.stderr)
    if not data.steps and not data.evals:
        skipped = f" ({len(data.skipped)} unreadable line(s) skipped)" if data.skipped else ""
        raise UserError(f"{args.log_file}: no step or eval records to plot{skipped}")
    # the last run's name: a restarted or resumed run's records replace the earlier ones (read_log)
    run_name = next((e.get("run_name") for e in reversed(data.events) if e.get("type") == "start"), None)
    title = None if run_name is None else str(run_name)
    out = plot_training_loss(LossHistory.from_records(data.steps, data.evals), args.output, title=title)
    skipped = f"; {len(data.skipped)} unreadable line(s) skipped" if data.skipped else ""
    if data.superseded:
        skipped += f"; {data.superseded} record(s) of an earlier run replaced by a later run's start"
    print(f"wrote {out} ({len(data.steps)} steps, {len(data.evals)} evals{skipped})")
    return 0
