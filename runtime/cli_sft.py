"""`surogate sft CONFIG`: supervised fine-tuning, plan + run in one step."""

from __future__ import annotations

import argparse

from surogate.runtime.cli_common import add_config_argument, load_with_overrides, print_result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_argument(parser)


def run(args: argparse.Namespace) -> int:
    from surogate.runtime.session import run_training

    return print_result(run_training(load_with_overrides(args.config, args.max_steps)))
