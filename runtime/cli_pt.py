"""`surogate pt CONFIG`: pre-training (raw text, loss on every token), plan + run in one step."""

from __future__ import annotations

import argparse

from surogate.errors import UserError
from surogate.runtime.cli_common import add_config_argument, load_with_overrides, print_result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_argument(parser)


def run(args: argparse.Namespace) -> int:
    from surogate.runtime.session import run_training

    cfg = load_with_overrides(args.config, args.max_steps)
    for i, ds in enumerate(cfg.datasets or ()):
        if ds.type not in ("text", "auto"):
            raise UserError(f"datasets[{i}].type: pre-training reads raw text (`type: text`), got {ds.type!r}; "
                            "use `surogate sft` for instruction or conversation data")
    return print_result(run_training(cfg))
