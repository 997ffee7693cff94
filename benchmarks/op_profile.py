"""Where a training step's GPU time goes, by plan op kind: the throughput job run eagerly with CUDA events
around every op, plus torch.profiler's top device kernels for one micro-step.

    python benchmarks/op_profile.py [--model-size 0.6b] [--full] [--lora-dtype bf16|fp32] [--no-recompute]
        [--offload offload_optimizer,offload_grads] [--json out.json]

Prints, per op kind: calls per step, device milliseconds per step and share; then the step's wall time, the
sum of op device time (the gap is host launch overhead that CUDA graphs remove) and the top kernels by device
time; with `--offload`, the offload copies' time on their own stream (overlapping the ops). Needs a GPU; without
one it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _gpu_job import SIZES, OurTrainer, our_config, packed_batches, save_preset_model  # noqa: E402
from roofline import device_floors  # noqa: E402
from throughput import offload_options  # noqa: E402


def timed_kernels(table: dict, events: list) -> None:
    """Wrap every kernel of `table` so that each call records (kind, start event, end event) into `events`."""
    for kind, fn in list(table.items()):
        def wrapped(ins, attrs, ctx, _fn=fn, _kind=kind):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = _fn(ins, attrs, ctx)
            end.record()
            events.append((_kind, start, end))
            return out
        table[kind] = wrapped


def timed_copies(copies, plan, events: list) -> None:
    """Wrap the executor's offload copies (`runtime/offload_copies.OffloadCopies.issue`) so that each records
    ("copy kind:role of the host tensor", start event, end event) on the stream it runs on (the copy stream: these
    times overlap the compute ops', they are not part of the op total)."""
    issue = copies.issue

    def wrapped(op, copy, _issue=issue):
        def timed():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()  # the current stream inside `copy`'s run: the copy stream
            copy()
            end.record()
            host = op.inputs[0] if op.kind == "copy_h2d" else op.outputs[0]
            role = plan.tensors[host].role.value
            events.append((f"{op.kind}:{role}", start, end))
        return _issue(op, timed)
    copies.issue = wrapped


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-size", choices=list(SIZES), default="0.6b")
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--lora-dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--no-recompute", action="store_true")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--accum", type=int, default=4)
    ap.add_argument("--offload", default="", help="offload_* options to set, comma-separated (as throughput.py)")
    ap.add_argument("--recipe", default="bf16", choices=["bf16", "fp8_hybrid"], help="precision recipe (as throughput.py)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("op_profile.py needs a CUDA GPU (torch sees none); nothing measured.")
        return 0
    args.eager = True
    with tempfile.TemporaryDirectory(prefix="surogate-profile-") as tmp:
        save_preset_model(args.model_size, Path(tmp) / "model")
        trainer = OurTrainer(our_config(Path(tmp) / "model", args, **offload_options(args)))
        vocab = trainer.plan.tensors["model.embed_tokens.weight"].shape[0]
        flat = packed_batches(3 * args.accum, args.batch, args.seq, vocab)
        trainer.train_step(flat[: args.accum])  # warm-up: Numba loads or compiles
        torch.cuda.synchronize()
        events: list = []
        copy_events: list = []
        timed_kernels(trainer.ex.kernels, events)
        timed_copies(trainer.ex.copies, trainer.plan, copy_events)
        t0 = time.perf_counter()
        trainer.train_step(flat[args.accum : 2 * args.accum])
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        per_kind: dict[str, list[float]] = defaultdict(list)
        for kind, start, end in events:
            per_kind[kind].append(start.elapsed_time(end))
        total = sum(sum(v) for v in per_kind.values())
        per_copy: dict[str, list[float]] = defaultdict(list)
        for kind, start, end in copy_events:
            per_copy[kind].append(start.elapsed_time(end))
        rows = sorted(((k, len(v), sum(v)) for k, v in per_kind.items()), key=lambda r: -r[2])
        floors = device_floors(trainer.plan, flat[args.accum : 2 * args.accum])
        print(f"{'op kind':<28}{'calls':>7}{'ms/step':>10}{'share':>8}{'floor ms':>10}{'of floor':>10}")
        for kind, n, ms in rows:
            fl = floors.get(kind)
            extra = f"{fl.seconds * 1e3:>10.2f}{fl.seconds * 1e3 / ms:>10.0%}" if fl and ms > 0 else ""
            print(f"{kind:<28}{n:>7}{ms:>10.2f}{ms / total:>8.1%}{extra}")
        if floors:
            floor_ms = sum(f.seconds for f in floors.values()) * 1e3
            print(f"step floor (roofline.py, this batch's documents) {floor_ms:.1f} ms = {floor_ms / total:.0%} of "
                  "the measured op time")
        if per_copy:  # offloading: the copy stream's time, overlapping the ops above
            print(f"{'offload copies (copy stream)':<28}{'calls':>7}{'ms/step':>10}")
            for kind, v in sorted(per_copy.items(), key=lambda kv: -sum(kv[1])):
                print(f"  {kind:<26}{len(v):>7}{sum(v):>10.2f}")
        tokens = args.batch * args.seq * args.accum
        print(f"eager step wall {wall * 1e3:.1f} ms; op device time (events, serialising) {total:.1f} ms "
              f"-> {tokens / (total / 1e3):.0f} tokens/s if launch-free")
        # the kernels themselves, one micro-step, without the per-op events
        for kind in list(trainer.ex.kernels):
            trainer.ex.kernels[kind] = trainer.ex.kernels[kind].__defaults__[0]
        del trainer.ex.copies.issue  # the class's own again
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            trainer.train_step(flat[2 * args.accum : 2 * args.accum + 1] * args.accum)
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70)
        print(table)
        if args.json:
            Path(args.json).write_text(json.dumps({"rows": rows, "wall_ms": wall * 1e3, "device_ms": total,
                                                   "copies": {k: [len(v), sum(v)] for k, v in per_copy.items()},
                                                   "floor_ms": {k: f.seconds * 1e3 for k, f in floors.items()},
                                                   "kernels_table": table}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
