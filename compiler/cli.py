"""`surogate plan CONFIG [-o plan.bin] [--gpu-memory 80GiB] [--json] [--dump-after PASS] [--plot memory.png]`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


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


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from surogate.compiler.fit import Replanner, StageTrace, paused_gc
    from surogate.compiler.pipeline import back_plan, front_graph
    from surogate.compiler.planfile import write_plan
    from surogate.compiler.report import (
        build_report,
        detect_gpu,
        device_total,
        parse_size,
        render_report,
        suggest_fixes,
    )
    from surogate.errors import UserError
    from surogate.schema import load_config

    if args.gpu_memory is not None and not args.gpu_memory.strip():
        raise UserError("--gpu-memory: empty; give a size such as 80GiB, or leave the option out")
    if args.plot is not None and Path(args.plot).is_dir():
        raise UserError(f"--plot: {args.plot} is a folder; give the image file to write (e.g. {Path(args.plot) / 'memory.png'})")
    gpu_memory = parse_size(args.gpu_memory) if args.gpu_memory else None
    cfg = load_config(args.config, warn=True)
    adapter = getattr(cfg, "adapter_path", None)
    # a malformed adapter is said now, not after the GPU hour is booked (one not here may be meant for another machine)
    if adapter and Path(adapter).is_dir():
        from surogate.runtime.peft_adapter import load_peft_adapter

        load_peft_adapter(adapter)
    gpu = detect_gpu()
    # With a GPU size to check against, the plan may not fit: record what each pass reads and keep copies
    # of the graph, so that the fit suggestions re-run only the passes their change affects.
    trace = StageTrace(cfg) if gpu_memory or gpu else None
    # With --json, stdout carries only the JSON document: the graph dump goes to stderr.
    out = sys.stderr if args.json else sys.stdout
    with paused_gc():
        plan = back_plan(front_graph(cfg, dump_after=args.dump_after, out=out, before=trace), cfg,
                         dump_after=args.dump_after, out=out, before=trace)
        report = build_report(plan, gpu_memory=gpu_memory, gpu=gpu)
        if report["fits"] is False and trace is not None:
            replan = Replanner(cfg, trace, device_total(plan.memory["device"]))
            report = build_report(plan, gpu_memory=gpu_memory, gpu=gpu,
                                  suggestions=suggest_fixes(plan, report["gpu"]["usable_bytes"], replan))
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
