"""The figures of one `gpu_checks.sh` run, gathered from its stage outputs into `summary.json` (and printed).

    python benchmarks/gpu_summary.py OUT_DIR --stages " smoke=0:41 tests=0:52 ..." --seconds 230

Figures (None where a stage did not produce them): tokens/s ours and transformers + peft and their ratio
(targets: >= 2.5x and >= 54k tokens/s on an H100), measured peak vs the plan's (target: within 3%), allocator
calls after warm-up (target: 0), bf16 parity errors vs transformers, kernel compile seconds, the pytest tally.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _pytest_tally(log: Path) -> dict | None:
    """Counts from pytest's last summary line ('3 passed, 1 failed, 2 skipped in 9.1s')."""
    try:
        lines = log.read_text().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        found = dict((k, int(n)) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors|deselected)", line))
        if found:
            failed = [ln.split(" ", 1)[1] for ln in lines if ln.startswith(("FAILED ", "ERROR "))]
            return {**found, "failed_tests": failed[:20]}
    return None


def summarise(out: Path, stages: str, seconds: float) -> dict[str, Any]:
    smoke, thr = _load(out / "smoke.json"), _load(out / "throughput.json")
    ours = (thr or {}).get("ours") or {}
    hf = (thr or {}).get("hf") or {}
    parity = (smoke or {}).get("parity") or {}
    graphs = (smoke or {}).get("graphs") or {}
    kernels = (smoke or {}).get("kernels") or {}
    tps = ours.get("tokens_per_s")
    ratio = (thr or {}).get("ratio")
    summary = {
        "device": ((smoke or {}).get("environment") or {}).get("device"),
        "seconds": seconds,
        "stages": {k: {"rc": int(v.split(":")[0]), "seconds": int(v.split(":")[1])}
                   for k, v in (s.split("=") for s in stages.split())},
        "throughput": {"ours_tokens_per_s": tps, "hf_peft_tokens_per_s": hf.get("tokens_per_s"), "ratio": ratio,
                       "target_ratio_2_5x": None if ratio is None else ratio >= 2.5,
                       "target_54k": None if tps is None else tps >= 54000,
                       "graphs": ours.get("graphs"), "eager_reason": ours.get("eager_reason"),
                       # how ours ran if the graphs run failed (eager, or eager with every fusion off) and why
                       "ran_as": (((thr or {}).get("runs") or [{}])[0]).get("ours_ran_as", "with CUDA graphs" if ours else None),
                       "failures": [f["failed"] + ": " + f["stderr"][-600:]
                                    for f in (((thr or {}).get("runs") or [{}])[0]).get("fallbacks", [])],
                       # the job's roofline (benchmarks/roofline.py) on this GPU, and ours as a share of it
                       "floor_tokens_per_s": ours.get("floor_tokens_per_s"), "of_floor": ours.get("of_floor"),
                       "captured": ours.get("captured"), "warmup_step_s": ours.get("warmup_step_s"),
                       "ops_per_program": ours.get("ops_per_program"),
                       "extra_jobs": [{**r.get("job", {}), "ratio": r.get("ratio"),
                                       "ours": (r.get("ours") or {}).get("tokens_per_s"),
                                       "hf": (r.get("hf") or {}).get("tokens_per_s")}
                                      for r in (thr or {}).get("runs", [])[1:]]},
        "memory": {"measured_peak_gib": ours.get("peak_gib"), "plan_peak_gib": ours.get("plan_peak_gib"),
                   "ratio": ours.get("peak_ratio"),
                   "within_3pct": None if ours.get("peak_ratio") is None else abs(ours["peak_ratio"] - 1) <= 0.03,
                   # allocator calls (cached blocks included: the loop's gradient-norm read makes some) and
                   # cudaMalloc segments / reserved bytes (new device memory) over the timed steps
                   "allocations_after_warmup_0_6b": ours.get("allocations_after_warmup"),
                   "segments_after_warmup_0_6b": ours.get("segments_after_warmup"),
                   "reserved_bytes_after_warmup_0_6b": ours.get("reserved_bytes_after_warmup"),
                   "allocations_after_step2_tiny": (graphs.get("graphs") or {}).get("allocations_after_step2"),
                   "hf_peak_gib": hf.get("peak_gib")},
        "parity_bf16_vs_transformers": {k: {m: v.get(m) for m in ("loss_err", "hf_bf16_loss_err", "max_grad_err",
                                                                  "max_grad_err_ratio", "worst_grad", "ok")}
                                        for k, v in parity.items() if isinstance(v, dict)},
        "graphs_vs_eager_max_rel_loss_diff": graphs.get("max_rel_loss_diff"),
        "kernels_at_size_failed": ((smoke or {}).get("kernels_at_size") or {}).get("failed"),
        "kernels": {"failed": kernels.get("failed"), "max_first_call_s": kernels.get("max_first_call_seconds"),
                    "sum_first_call_s": kernels.get("sum_first_call_seconds")},
        "tests": _pytest_tally(out / "tests.log"),
        "smoke_ok": (smoke or {}).get("ok"),
    }
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--stages", default="")
    ap.add_argument("--seconds", type=float, default=0.0)
    args = ap.parse_args(argv)
    out = Path(args.out)
    summary = summarise(out, args.stages, args.seconds)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print("== summary.json")
    print(json.dumps(summary, indent=1, default=str))
    return 0 if summary["smoke_ok"] and all(s["rc"] == 0 for s in summary["stages"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
