"""Times `surogate plan` for the Qwen3-32B preset (target: < 10 s on 2 cores) and prints the ratios.

Runs the command in-process (as the console script does) on temporary configs, with the report sent to
a throwaway buffer: LoRA (the default) as a plain plan written to plan.bin, then full fine-tuning with `--gpu-memory 80GiB`,
which does not fit, so the fit suggestions (one re-plan per knob, then a greedy combination) are
included. The first call of the process pays the imports; `--repeat` reports the best of N.

    .venv/bin/python benchmarks/plan_speed.py [--model Qwen/Qwen3-32B] [--sequence-len 4096] [--repeat 2]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import tempfile
import time
from pathlib import Path

from surogate.cli import main as surogate_main

TARGET_S = 10.0


def time_plan(config: Path, *extra: str) -> tuple[float, float, dict]:
    """Wall seconds, CPU seconds of this process (load-independent on a shared machine), report."""
    out = io.StringIO()
    start, cpu = time.perf_counter(), time.process_time()
    with contextlib.redirect_stdout(out):
        rc = surogate_main(["plan", str(config), "--json", *extra])
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    if rc != 0:
        raise SystemExit(f"surogate plan exited {rc}")
    return elapsed, cpu, json.loads(out.getvalue())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="Qwen/Qwen3-32B")
    ap.add_argument("--sequence-len", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cases = []
        for name, lora in (("lora", "true"), ("full", "false")):
            cfg = Path(tmp) / f"{name}.yaml"
            cfg.write_text(f"model: {args.model}\nsequence_len: {args.sequence_len}\nlora: {lora}\n")
            cases.append(cfg)
        runs = (("LoRA: plan -o plan.bin", cases[0], ("-o", str(Path(tmp) / "plan.bin"))),
                ("full FT: plan --gpu-memory 80GiB (+ fit suggestions)", cases[1], ("--gpu-memory", "80GiB")))
        for label, cfg, extra in runs:
            times, cpus = [], []
            for _ in range(args.repeat):
                t, cpu, report = time_plan(cfg, *extra)
                times.append(t)
                cpus.append(cpu)
            best = min(times)
            dev = report["memory"]["device"]
            print(f"{label}: best {best:.2f} s of {', '.join(f'{t:.2f}' for t in times)} (target {TARGET_S:.0f} s, ratio {best / TARGET_S:.2f}; "
                  f"CPU {min(cpus):.2f} s, ratio {min(cpus) / TARGET_S:.2f}); "
                  f"{report['parameters']['total'] / 1e9:.1f}B params, device arena {dev['peak_bytes'] / 2**30:.1f} GiB, "
                  f"arena / lower bound {dev['ratio_to_lower_bound']:.4f}, fits={report['fits']}, "
                  f"{len(report['suggestions'])} suggestions")


if __name__ == "__main__":
    main()
