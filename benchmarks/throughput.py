"""GPU training throughput: Surogate (cuda backend, CUDA graphs) vs transformers + peft, same job, same batches.

    python benchmarks/throughput.py [--model-size 0.6b|1.7b|4b] [--full] [--steps 3] [--eager]

The job: a random Qwen3-0.6B-shaped model (the preset architecture, random bf16 weights, nothing downloaded),
BF16, LoRA r16 / alpha 32 on all seven projections with bf16 adapters on both sides (the issue's "BF16 LoRA";
`--lora-dtype fp32`: fp32 adapters, PEFT's default; `--full`: full fine-tune), sequence 2048, batch 2 x gradient
accumulation 4, packed rows of synthetic tokens. Ours: cuda backend, CUDA graphs on (`--eager`: off), 8-bit AdamW,
`recompute: true` (`--no-recompute`: every activation kept, the contract's fastest setting). transformers + peft: SDPA attention, gradient checkpointing on, torch AdamW, the same rows (HF gets
no document boundaries: timing only). Each side runs in its own subprocess after one warm-up step (ours needs
two: warm-up, then capture). Prints tokens/s and the ratio. Without a GPU it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from surogate.compiler.report import device_total

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _gpu_job import PROJ, SIZES, OurTrainer, our_config, packed_batches, save_preset_model, timed  # noqa: E402
from roofline import device_floors  # noqa: E402


def _batches(args: argparse.Namespace, vocab: int) -> list[list[dict]]:
    flat = packed_batches((args.steps + 2) * args.accum, args.batch, args.seq, vocab)
    return [flat[i * args.accum : (i + 1) * args.accum] for i in range(args.steps + 2)]


def run_ours(work: Path, args: argparse.Namespace) -> dict:
    """Ours, with the memory figures of the same run: measured peak vs the plan's, allocator calls after warm-up."""
    import time

    from surogate.runtime.cuda_graphs import AllocationRecorder

    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    trainer = OurTrainer(our_config(work / "model", args, **offload_options(args)))
    setup_s = time.perf_counter() - t0
    vocab = trainer.plan.tensors["model.embed_tokens.weight"].shape[0]
    steps = _batches(args, vocab)
    warm_s = []
    # where the peak comes from: allocated bytes (above the baseline) after set-up and after each warm-up step,
    # and the peak reached in each phase
    mib = lambda b: round(b / 2**20, 1)  # noqa: E731
    memory = {"after_setup_mib": mib(torch.cuda.memory_allocated() - base),
              "peak_setup_mib": mib(torch.cuda.max_memory_allocated() - base)}
    for i in range(2):  # eager warm-up (Numba compiles or loads its cache), then the capture
        t0 = time.perf_counter()
        torch.cuda.reset_peak_memory_stats()
        trainer.train_step(steps[i])
        torch.cuda.synchronize()
        warm_s.append(round(time.perf_counter() - t0, 2))
        memory[f"after_step{i + 1}_mib"] = mib(torch.cuda.memory_allocated() - base)
        memory[f"peak_step{i + 1}_mib"] = mib(torch.cuda.max_memory_allocated() - base)
    torch.cuda.reset_peak_memory_stats()
    rec = AllocationRecorder()
    rec.record()
    elapsed, losses = timed(lambda i: trainer.train_step(steps[2 + i]), 0, args.steps)
    rec.record()
    memory["peak_timed_mib"] = mib(torch.cuda.max_memory_allocated() - base)
    measured = max(memory[k] for k in memory if k.startswith("peak")) * 2**20
    planned = device_total(trainer.plan.memory["device"])  # arena + the backend's own buffers
    dev = trainer.plan.memory["device"]
    memory["plan_arena_mib"] = mib(dev["peak_bytes"])
    memory["plan_workspace"] = {k: mib(v) if isinstance(v, int) else v
                                for k, v in (dev.get("backend_workspace") or {}).items()}
    ops = {name: len(prog) for name, prog in trainer.ex.programs.items()}
    step_tokens = args.accum * args.batch * args.seq
    tokens_per_s = args.steps * step_tokens / elapsed
    floors = device_floors(trainer.plan, steps[2])  # roofline.py: this job at the GPU's peaks, its documents
    floor_tps = step_tokens / sum(f.seconds for f in floors.values()) if floors else None
    return {"tokens_per_s": tokens_per_s, "losses": losses, "floor_tokens_per_s": floor_tps,
            "of_floor": tokens_per_s / floor_tps if floor_tps else None,
            "graphs": trainer.graphs.enabled, "eager_reason": trainer.graphs.reason,
            "captured": sorted(map(str, trainer.graphs.graphs)), "peak_gib": measured / 2**30,
            "plan_peak_gib": planned / 2**30, "peak_ratio": measured / planned, "setup_s": round(setup_s, 2),
            "warmup_step_s": warm_s, "allocations_after_warmup": rec.deltas()[0]["allocation.all.allocated"],
            "segments_after_warmup": rec.deltas()[0]["segment.all.allocated"],
            "reserved_bytes_after_warmup": rec.deltas()[0]["reserved_bytes.all.current"],
            "ops_per_program": ops, "scratch_mib": trainer.ex.kernels.state.scratch_bytes / 2**20, "memory": memory}


def offload_options(args: argparse.Namespace) -> dict:
    """Ours: the `--offload` options (comma-separated offload_* names) as config settings; offloaded gradients
    need ZeRO-2's gradient layout."""
    names = [n for n in (getattr(args, "offload", "") or "").split(",") if n]
    over: dict = dict.fromkeys(names, True)
    if "offload_grads" in names:
        over["zero_level"] = 2
    return over


def run_hf(work: Path, args: argparse.Namespace) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.bfloat16, attn_implementation="sdpa").cuda()
    if not args.full:
        from peft import LoraConfig, get_peft_model

        # lora_dtype fp32 = PEFT's default (adapters upcast to fp32); bf16 keeps them in the model's dtype
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=args.lora_dropout,
                                                  target_modules=PROJ),
                               autocast_adapter_dtype=args.lora_dtype == "fp32")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    steps = _batches(args, model.config.vocab_size)

    def step(i: int) -> float:
        total = 0.0
        for b in steps[i]:
            loss = model(input_ids=b["input_ids"].cuda(), labels=b["labels"].cuda()).loss / args.accum
            loss.backward()
            total += float(loss)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return total

    elapsed, losses = timed(step, 1, args.steps)
    return {"tokens_per_s": args.steps * args.accum * args.batch * args.seq / elapsed, "losses": losses[1:],
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-size", choices=list(SIZES), default="0.6b")
    p.add_argument("--full", action="store_true", help="full fine-tune instead of LoRA")
    p.add_argument("--eager", action="store_true", help="ours without CUDA graphs")
    p.add_argument("--lora-dtype", choices=["fp32", "bf16"], default="bf16",
                   help="adapter dtype on both sides (bf16: the issue's BF16 LoRA; fp32: PEFT's default and ours)")
    p.add_argument("--lora-dropout", type=float, default=0.0,
                   help="adapter dropout on both sides (0.0: the benchmark; the contract's default is 0.05)")
    p.add_argument("--no-recompute", action="store_true",
                   help="ours with recompute: false (HF keeps gradient checkpointing, as the issue sets it)")
    p.add_argument("--lmhead-chunks", type=int, default=1,
                   help="ours: LM-head row chunks (the logits workspace holds rows / N rows: smaller, L2-resident)")
    p.add_argument("--offload", default="", help="ours: offload_* options to set, comma-separated (the copies run "
                   "on a side stream; compare with the same job without them)")
    p.add_argument("--recipe", default="bf16", choices=["bf16", "fp8_hybrid"],
                   help="ours: the precision recipe (HF stays bf16: the baseline a user switches from)")
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--accum", type=int, default=4)
    p.add_argument("--extra", default="", help="more jobs after the main one, comma-separated names of EXTRAS "
                   f"({', '.join(EXTRAS)}); each runs only if --budget-s leaves time for it")
    p.add_argument("--budget-s", type=float, default=0.0, help="wall-clock seconds for the whole run (extras)")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--runner", choices=["ours", "hf"], help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def attempts(runner: str, eager: bool) -> list[tuple[list[str], dict, str]]:
    """The ways to run one side, in order, each tried only if the one before failed: (extra flags, extra env,
    what failing it means). Ours falls back from CUDA graphs to eager, then to the unfused program (every fusion
    and stacking pass off): one device call must give a figure even if a capture or a fused kernel breaks."""
    if runner != "ours":
        return [([], {}, "run")]
    from surogate.compiler.passes.fusion import OFF_ALL, OFF_ENV

    tried = [] if eager else [([], {}, "with CUDA graphs")]
    return [*tried, (["--eager"], {}, "eager"), (["--eager"], {OFF_ENV: OFF_ALL}, "eager, every fusion off")]


def compare(args: argparse.Namespace, deadline: float | None, hf_result: dict | None = None) -> dict:
    """Ours and transformers + peft on the job `args` names, each in its own process (same saved model); with a
    `deadline` (time.monotonic()), each process gets an equal share of the time left. `hf_result`: the HF figure
    of a job whose HF side is the same (an extra that changes only ours): HF is not run again."""
    import time

    base = ["--model-size", args.model_size, "--steps", str(args.steps), "--seq", str(args.seq), "--batch",
            str(args.batch), "--accum", str(args.accum), "--lora-dtype", args.lora_dtype,
            "--lora-dropout", str(getattr(args, "lora_dropout", 0.0)),
            *(["--full"] if args.full else []), *(["--no-recompute"] if args.no_recompute else []),
            *(["--eager"] if args.eager else []), "--lmhead-chunks", str(getattr(args, "lmhead_chunks", 1)),
            "--offload", getattr(args, "offload", "") or "", "--recipe", getattr(args, "recipe", "bf16")]
    env = getattr(args, "env", None) or {}  # an extra's experiment switches, for our process only
    job = {"model_size": args.model_size, "full": args.full, "eager": args.eager, "lora_dtype": args.lora_dtype,
           "recompute": not args.no_recompute, "lmhead_chunks": getattr(args, "lmhead_chunks", 1),
           "lora_dropout": getattr(args, "lora_dropout", 0.0), "offload": getattr(args, "offload", "") or "",
           "recipe": getattr(args, "recipe", "bf16")}
    results: dict = {"job": {**job, "env": env} if env else job}
    with tempfile.TemporaryDirectory(prefix="surogate-gpu-bench-") as tmp:
        work = Path(tmp)
        save_preset_model(args.model_size, work / "model")
        if hf_result is not None:
            results["hf"], results["hf_reused"] = hf_result, True  # an earlier job's: the same HF side
        for k, runner in enumerate(("ours",) if hf_result is not None else ("ours", "hf")):
            cmd = [sys.executable, __file__, *base, "--runner", runner, "--work", str(work)]
            # ours gets 3/5 of the time left (kernel compile or cache load, plan, warm-up and capture), HF the rest
            timeout = None if deadline is None else max(5.0, (deadline - time.monotonic()) * (0.6 if k == 0 else 1))
            proc, failed = None, ""
            for n, (flags, extra_env, why) in enumerate(attempts(runner, args.eager)):
                if n:  # the previous attempt failed: say how, then try the next fallback for a figure
                    print(f"[{runner}] failed ({failed}):\n{proc.stderr[-4000:]}\n[{runner}] retrying: {' '.join(flags)} "
                          f"{extra_env}", file=sys.stderr)
                    results.setdefault("fallbacks", []).append({"failed": failed, "stderr": proc.stderr[-2000:]})
                    timeout = None if deadline is None else max(5.0, (deadline - time.monotonic()) / 2)
                try:
                    proc = subprocess.run([*cmd, *flags], capture_output=True, text=True, timeout=timeout,
                                          env={**os.environ, "PYTHONWARNINGS": "ignore", **(env if k == 0 else {}),
                                               **extra_env})
                except subprocess.TimeoutExpired:
                    print(f"[{runner}] out of time ({timeout:.0f} s)", file=sys.stderr)
                    proc = None
                    break
                if proc.returncode == 0:
                    if n:
                        results["ours_ran_as"] = why
                    break
                failed = why
            if proc is None:
                results[runner] = None
                continue
            if proc.returncode != 0:
                print(f"[{runner}] failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}", file=sys.stderr)
                results[runner] = None
                continue
            results[runner] = json.loads(proc.stdout.strip().splitlines()[-1])
    ours, hf = results["ours"], results["hf"]
    results["ratio"] = ours["tokens_per_s"] / hf["tokens_per_s"] if ours and hf else None
    mode = "full fine-tune" if args.full else f"LoRA r16 (7 projections, {args.lora_dtype} adapters)"
    mode += f", lora_dropout {args.lora_dropout}" if getattr(args, "lora_dropout", 0.0) else ""
    mode += ", ours with recompute: false" if args.no_recompute else ""
    mode += f", ours with lmhead_chunks: {args.lmhead_chunks}" if getattr(args, "lmhead_chunks", 1) > 1 else ""
    mode += "".join(f", ours with {k}={v}" for k, v in env.items())
    mode += f", ours with {args.offload}" if getattr(args, "offload", "") else ""
    mode += f", ours in recipe {args.recipe}" if getattr(args, "recipe", "bf16") != "bf16" else ""
    print(f"job: {SIZES[args.model_size]}-shaped, bf16, {mode}, seq {args.seq} x batch {args.batch} x accum "
          f"{args.accum}, packed rows, {args.steps} timed steps, {torch.cuda.get_device_name()}")
    for name, r in (("surogate (cuda, graphs)" if not args.eager else "surogate (cuda, eager)", ours),
                    ("transformers + peft" + (" (earlier job's)" if hf_result is not None else ""), hf)):
        if r is None:
            print(f"{name:<26} FAILED")
        else:
            print(f"{name:<26}{r['tokens_per_s']:>12.0f} tokens/s  peak {r['peak_gib']:.2f} GiB  losses "
                  f"{[round(x, 4) for x in r['losses']]}")
    if ours:
        if ours.get("floor_tokens_per_s"):
            print(f"surogate: {ours['of_floor']:.0%} of this job's floor on this GPU ({ours['floor_tokens_per_s']:,.0f} "
                  "tokens/s, benchmarks/roofline.py)")
        print(f"surogate: plan peak {ours['plan_peak_gib']:.3f} GiB, measured/plan x{ours['peak_ratio']:.4f}, "
              f"after warm-up: {ours['allocations_after_warmup']} allocator calls, {ours['segments_after_warmup']} "
              f"cudaMalloc segments, reserved +{ours['reserved_bytes_after_warmup']} B; warm-up steps "
              f"{ours['warmup_step_s']} s, "
              f"ops {ours['ops_per_program']}, graphs {ours['graphs']} ({ours['eager_reason'] or ours['captured']})")
    if ours and hf:
        print(f"ratio (surogate / HF): throughput x{results['ratio']:.2f}, peak memory x"
              f"{ours['peak_gib'] / hf['peak_gib']:.2f}")
    return results


# name -> the job's settings over the main job's (model size, full fine-tune, adapter dtype, recompute; `env`:
# experiment switches for our process; `ours_only`: HF's side is the main job's, its figure is reused; `hf_from`:
# HF's side is that earlier extra's; `offload`: offload_* options for ours)
EXTRAS = {
    # the A/B of the stacked LoRA down-projections (compiler/passes/lora_group.py): the unstacked program
    "0.6b-nostack": {"model_size": "0.6b", "full": False, "lora_dtype": "bf16", "no_recompute": False,
                     "env": {"SUROGATE_FUSIONS_OFF": "group_lora_projections"}, "ours_only": True},
    # the A/B of the folded LoRA up-projections (compiler/passes/lora_fold.py): merges after stacked base GEMMs
    "0.6b-nofold": {"model_size": "0.6b", "full": False, "lora_dtype": "bf16", "no_recompute": False,
                    "env": {"SUROGATE_FUSIONS_OFF": "fold_lora_up_projection"}, "ours_only": True},
    "0.6b-norecompute": {"model_size": "0.6b", "full": False, "lora_dtype": "bf16", "no_recompute": True,
                         "ours_only": True},  # HF keeps gradient checkpointing
    # the mid-layer residual kept as a checkpoint (compiler/passes/recompute.py): less recompute, more memory
    "0.6b-keepmid": {"model_size": "0.6b", "full": False, "lora_dtype": "bf16", "no_recompute": False,
                     "env": {"SUROGATE_RECOMPUTE_KEEP": "ffn_input"}, "ours_only": True},
    # the attention outputs kept as checkpoints: no flash forward in the recompute (+456 MiB at 0.6B)
    "0.6b-keepattn": {"model_size": "0.6b", "full": False, "lora_dtype": "bf16", "no_recompute": False,
                      "env": {"SUROGATE_RECOMPUTE_KEEP": "attention"}, "ours_only": True},
    # 16 LM-head row chunks: a 76 MB logits chunk instead of 1.2 GB (plan 2.68 -> 1.71 GiB), maybe served from L2
    "0.6b-lmchunks16": {"model_size": "0.6b", "full": False, "lora_dtype": "bf16", "no_recompute": False,
                        "lmhead_chunks": 16, "ours_only": True},
    "0.6b-fp32": {"model_size": "0.6b", "full": False, "lora_dtype": "fp32", "no_recompute": False},
    # the A/B of the fp32 adapters' parts split once per run (cuda_sizes.gemm_route `weight`): a split per GEMM
    "0.6b-fp32-nocache": {"model_size": "0.6b", "full": False, "lora_dtype": "fp32", "no_recompute": False,
                          "env": {"SUROGATE_SPLIT_CACHE": "0"}, "hf_from": "0.6b-fp32"},
    # the contract's defaults (fp32 adapters, lora_dropout 0.05) on both sides: what a user who sets neither gets
    # (no stacking or fold: those need dropout 0 and adapters in the model's dtype)
    "0.6b-defaults": {"model_size": "0.6b", "full": False, "lora_dtype": "fp32", "lora_dropout": 0.05,
                      "no_recompute": False},
    "0.6b-full": {"model_size": "0.6b", "full": True, "no_recompute": False},
    # offloaded optimizer states and gradients (copies on a side stream, runtime/offload_copies.py): ours beside
    # 0.6b-full's own figure (`hf_from`: that extra's HF side is this job's), the cost of the host round trips
    "0.6b-full-offload": {"model_size": "0.6b", "full": True, "no_recompute": False,
                          "offload": "offload_optimizer,offload_grads", "hf_from": "0.6b-full"},
    # recipe fp8_hybrid on ours (FP8 tensor-core GEMMs, runtime/backends/cuda_fp8.py) beside HF bf16: the contract
    # says "2x throughput" over bf16; compare with the main job's (LoRA) and 0.6b-full's (full) own figures
    "0.6b-fp8": {"model_size": "0.6b", "full": False, "lora_dtype": "bf16", "no_recompute": False,
                 "recipe": "fp8_hybrid", "ours_only": True},
    "0.6b-full-fp8": {"model_size": "0.6b", "full": True, "no_recompute": False, "recipe": "fp8_hybrid",
                      "hf_from": "0.6b-full"},
    **{f"{size}{suffix}": {"model_size": size, "full": bool(suffix), "lora_dtype": "bf16", "no_recompute": False}
       for size in ("1.7b", "4b") for suffix in ("", "-full")},
}


def main(argv: list[str] | None = None) -> int:
    import time

    started = time.monotonic()
    args = parse(argv)
    if not torch.cuda.is_available():
        print("throughput.py needs a CUDA GPU (torch sees none); nothing measured.")
        return 0
    if args.runner:
        run = run_ours if args.runner == "ours" else run_hf
        print(json.dumps(run(Path(args.work), args)))
        return 0
    deadline = started + args.budget_s if args.budget_s > 0 else None
    main_job = compare(args, deadline)
    runs = [main_job]
    hf_of: dict[str, dict] = {}  # extra -> its HF figure, for an extra naming it in `hf_from`
    for name in [e for e in args.extra.split(",") if e]:
        left = args.budget_s - (time.monotonic() - started)
        if name not in EXTRAS or left < 60:  # a job needs a model save and two processes: skip rather than cut
            print(f"[extra {name}] skipped ({'unknown' if name not in EXTRAS else f'{left:.0f} s left'})")
            continue
        over = dict(EXTRAS[name])
        same_hf = over.pop("ours_only", False) and main_job["hf"] is not None
        hf = main_job["hf"] if same_hf else hf_of.get(over.pop("hf_from", ""))
        runs.append(compare(argparse.Namespace(**{**vars(args), **over}), deadline, hf))
        if runs[-1].get("hf") is not None:
            hf_of[name] = runs[-1]["hf"]
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "ours": main_job["ours"], "hf": main_job["hf"],
                                               "ratio": main_job["ratio"], "runs": runs}, indent=1))
    return 0 if main_job["ours"] and main_job["hf"] else 1


if __name__ == "__main__":
    sys.exit(main())
