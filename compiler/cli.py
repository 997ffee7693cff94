"""`surogate plan CONFIG [-o plan.bin] [--gpu-memory 80GiB] [--json] [--dump-after PASS] [--plot memory.png]`."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from surogate.errors import ConfigError, UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from surogate.compiler.pipeline import PASS_NAMES

    parser.add_argument("config", help="training config (YAML)")
    parser.add_argument("-o", "--output", metavar="PLAN", help="write the compiled plan here (e.g. plan.bin)")
    parser.add_argument("--gpu-memory", metavar="SIZE",
                        help="GPU memory to check the plan against (e.g. 80GiB, 24GB); default: detected GPU")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--dump-after", metavar="PASS", choices=PASS_NAMES,
                        help=f"print the graph after this pass ({', '.join(PASS_NAMES)})")
    parser.add_argument("--plot", metavar="PNG", help="draw the device memory timeline to this image")


def replanner(cfg: Any, front_snapshot: bytes | None = None) -> Any:
    """A function changes -> Plan (None when the changed config is invalid), for fit suggestions.

    Front-half graphs are cached (pickled) by the front-half options changed, so a change to back-half
    options only re-runs the back half, and combinations of knobs reuse the front graph of their
    front-half part. `front_snapshot` is the unchanged config's front graph.
    """
    from surogate.compiler.pipeline import BACK_HALF_OPTIONS, back_plan, front_graph, restore, snapshot
    from surogate.compiler.plan import config_dict
    from surogate.schema import config_from_dict

    to_dict = getattr(cfg, "to_dict", None)
    base = to_dict() if callable(to_dict) else config_dict(cfg)
    fronts: dict[str, bytes] = {} if front_snapshot is None else {"{}": front_snapshot}

    def replan(changes: dict[str, Any]) -> Any:
        try:
            changed = config_from_dict({**base, **changes})
        except (ConfigError, UserError, TypeError):
            return None
        key = json.dumps({k: v for k, v in changes.items() if k not in BACK_HALF_OPTIONS}, sort_keys=True)
        if key not in fronts:
            fronts[key] = snapshot(front_graph(changed))
        return back_plan(restore(fronts[key]), changed, normalize=False)  # only its memory report is read

    return replan


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from surogate.compiler.pipeline import back_plan, front_graph, snapshot
    from surogate.compiler.planfile import write_plan
    from surogate.compiler.report import build_report, detect_gpu, parse_size, render_report, suggest_fixes
    from surogate.schema import load_config

    gpu_memory = parse_size(args.gpu_memory) if args.gpu_memory else None
    cfg = load_config(args.config)
    # With --json, stdout carries only the JSON document: the graph dump goes to stderr.
    out = sys.stderr if args.json else sys.stdout
    graph = front_graph(cfg, dump_after=args.dump_after, out=out)
    saved = snapshot(graph)  # before the back half mutates it: re-plans for suggestions start here
    plan = back_plan(graph, cfg, dump_after=args.dump_after, out=out)
    gpu = detect_gpu()
    report = build_report(plan, gpu_memory=gpu_memory, gpu=gpu)
    if report["fits"] is False:
        capacity = report["gpu"]["usable_bytes"]
        report = build_report(plan, gpu_memory=gpu_memory, gpu=gpu,
                              suggestions=suggest_fixes(plan, capacity, replanner(cfg, saved)))
    if args.output:
        path = write_plan(plan, args.output)
        report["plan_file"] = str(path)
    if args.plot:
        from surogate.compiler.plot import plot_memory

        report["plot_file"] = str(plot_memory(plan, args.plot))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        console = Console()
        console.print(render_report(report, plan))
        for key, what in (("plan_file", "plan written to"), ("plot_file", "memory timeline written to")):
            if key in report:
                console.print(f"{what} {report[key]}")
    return 0
