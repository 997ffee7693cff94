"""`surogate run plan.bin`: execute a compiled plan (its resolved config travels inside it)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("plan", metavar="PLAN", help="plan.bin written by `surogate plan -o`")


def run(args: argparse.Namespace) -> int:
    from surogate.compiler.models.resolve import check_plan_model, resolve_model
    from surogate.compiler.planfile import read_plan
    from surogate.runtime.cli_common import print_result
    from surogate.runtime.session import run_training
    from surogate.schema import config_from_dict

    plan = read_plan(args.plan)
    cfg = config_from_dict(plan.config, source=f"{args.plan} (embedded config)")
    # the plan is the model's graph as it was: a folder changed since (more layers, other shapes) is refused
    check_plan_model(plan.meta.get("spec"), resolve_model(cfg), args.plan, weights=not cfg.from_scratch)
    return print_result(run_training(cfg, plan=plan))
