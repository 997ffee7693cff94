"""`surogate plot LOG_FILE [-o out.png]`: redraw the loss plot from a JSONL training log."""

from __future__ import annotations

import argparse

from surogate.errors import UserError
from surogate.runtime.observe.history import LossHistory
from surogate.runtime.observe.jsonl import read_log
from surogate.runtime.observe.plot import plot_training_loss


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("log_file", metavar="LOG_FILE", help="JSONL training log written by `log_file`")
    parser.add_argument("-o", "--output", default="training_loss.png", help="image to write (PNG)")


def run(args: argparse.Namespace) -> int:
    data = read_log(args.log_file)
    if not data.steps and not data.evals:
        raise UserError(f"{args.log_file}: no step or eval records to plot")
    run_name = next((e.get("run_name") for e in data.events if e.get("type") == "start"), None)
    out = plot_training_loss(LossHistory.from_records(data.steps, data.evals), args.output, title=run_name)
    print(f"wrote {out} ({len(data.steps)} steps, {len(data.evals)} evals)")
    return 0
