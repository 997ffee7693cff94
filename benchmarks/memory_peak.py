"""Measured GPU memory of training vs the plan's device peak (the plan is the allocation: the ratio should be ~1).

    python benchmarks/memory_peak.py [--model-size 0.6b|1.7b|4b] [--full] [--steps 3] [--eager]

Same job as throughput.py (preset-shaped random bf16 model, LoRA r16 on seven projections or `--full`, sequence
2048, batch 2 x accumulation 4, packed rows). Prints the plan's device peak, `torch.cuda.max_memory_allocated`
over the steps (minus what was allocated before the executor), the ratio, and the cuda table's scratch bytes.
Without a GPU it prints the plan's peak only and exits 0.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from surogate.compiler.report import device_total

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _gpu_job import SIZES, OurTrainer, our_config, packed_batches, save_preset_model  # noqa: E402


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-size", choices=list(SIZES), default="0.6b")
    p.add_argument("--full", action="store_true")
    p.add_argument("--eager", action="store_true", help="without CUDA graphs")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--accum", type=int, default=4)
    p.add_argument("--json", help="also write the results to this file")
    return p.parse_args(argv)


def _plan_only(args: argparse.Namespace) -> int:
    from surogate.compiler.pipeline import compile_plan

    cfg = our_config(SIZES[args.model_size], args)
    peak = device_total(compile_plan(cfg).memory["device"])
    print(f"memory_peak.py needs a CUDA GPU to measure; the plan's device peak for this job is {peak / 2**30:.3f} GiB")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if not torch.cuda.is_available():
        return _plan_only(args)
    with tempfile.TemporaryDirectory(prefix="surogate-mem-") as tmp:
        model = save_preset_model(args.model_size, Path(tmp) / "model")
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        trainer = OurTrainer(our_config(model, args))
        vocab = trainer.plan.tensors["model.embed_tokens.weight"].shape[0]
        flat = packed_batches(args.steps * args.accum, args.batch, args.seq, vocab)
        for s in range(args.steps):
            trainer.train_step(flat[s * args.accum : (s + 1) * args.accum])
        torch.cuda.synchronize()
        measured = torch.cuda.max_memory_allocated() - base
        planned = device_total(trainer.plan.memory["device"])  # arena + the backend's own buffers
        arena = int(trainer.plan.arenas.get("device", 0))
        scratch = trainer.ex.kernels.state.scratch_bytes
    gib = 2**30
    print(f"job: {SIZES[args.model_size]}-shaped, bf16, {'full' if args.full else 'LoRA r16'}, seq {args.seq} x "
          f"batch {args.batch} x accum {args.accum}, {args.steps} steps, graphs {trainer.graphs.enabled}, "
          f"{torch.cuda.get_device_name()}")
    print(f"plan device peak {planned / gib:.3f} GiB (arena {arena / gib:.3f} GiB); measured max allocated "
          f"{measured / gib:.3f} GiB; ratio measured / plan x{measured / planned:.4f} "
          f"(cuda-table scratch {scratch / 2**20:.1f} MiB)")
    if args.json:
        Path(args.json).write_text(json.dumps({"planned": planned, "arena": arena, "measured": measured,
                                               "scratch": scratch, "ratio": measured / planned}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
