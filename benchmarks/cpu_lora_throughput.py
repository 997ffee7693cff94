"""CPU LoRA training throughput and peak memory: Surogate's runtime vs transformers + peft, same job, same batches.

    .venv/bin/python benchmarks/cpu_lora_throughput.py [--steps 5] [--threads N] [--hidden 256 --layers 4 ...]

The job: a randomly initialised Qwen3-shaped model (default hidden 256, 4 layers, 4 heads of 64, 2 KV heads,
MLP 768, vocabulary 4096, fp32), LoRA r=16 / alpha 32 / dropout 0 on all seven projections, sequence 256,
batch 4, no accumulation, activation recomputation on (ours: `recompute: true`; HF: gradient checkpointing),
AdamW (ours: the runtime's `adamw_8bit`, the AdamW it has; HF: `torch.optim.AdamW` on the LoRA parameters).
Each side runs in its own subprocess (so peak RSS is its own), trains one warm-up step and then `--steps` timed
steps on the same pre-generated token batches. Data loading is excluded on both sides. Prints tokens/s, peak
RSS and the ratios, and the first-step losses (equal: both start from the same weights with LoRA B = 0).
Nothing is downloaded. Timings on a shared machine are noisy: compare ratios from one run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_job(work: Path, args: argparse.Namespace) -> None:
    """Save the model and the batches both runners read."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    config = Qwen3Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                         head_dim=args.hidden // args.heads, max_position_embeddings=max(512, args.seq),
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(work / "model")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.steps + 1, args.batch, args.seq), generator=g)
    torch.save(ids, work / "batches.pt")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_ours(work: Path, args: argparse.Namespace) -> dict:
    from surogate.compiler.pipeline import compile_plan
    from surogate.runtime.backends import kernel_table
    from surogate.runtime.batches import plan_inputs
    from surogate.runtime.executor import MICRO_STEP, OPTIMIZER_STEP, ArenaExecutor, StepContext
    from surogate.runtime.reference import load_weights
    from surogate.runtime.trainer import loss_tensor
    from surogate.runtime.weights import initialise
    from surogate.schema import config_from_dict

    cfg = config_from_dict({
        "model": str(work / "model"), "sequence_len": args.seq, "per_device_train_batch_size": args.batch,
        "gradient_accumulation_steps": 1, "torch_dtype": "float32", "lora": True, "lora_rank": args.rank,
        "lora_alpha": 2 * args.rank, "lora_dropout": 0.0, "recompute": True, "optimizer": "adamw_8bit",
        "learning_rate": 1e-4, "weight_decay": 0.0, "use_cuda_graphs": False,
    })
    plan = compile_plan(cfg)
    loss_name = loss_tensor(plan)
    ex = ArenaExecutor(plan, kernel_table("cpu"), watch=[loss_name])
    initialise(ex, load_weights(plan, cfg.model, lora_seed=0))
    batches = torch.load(work / "batches.pt")
    b, t = args.batch, args.seq
    losses, start = [], 0.0
    for step, ids in enumerate(batches):
        if step == 1:
            start = time.perf_counter()  # step 0 is the warm-up
        batch = {"input_ids": ids, "labels": ids, "position_ids": torch.arange(t).expand(b, t),
                 "cu_seqlens": torch.arange(0, b * t + 1, t)}
        ex.zero_gradients()
        for name, value in plan_inputs(plan, batch).items():
            ex.write(name, value)
        ex.run(MICRO_STEP, StepContext(plan, step))
        losses.append(float(ex.observed[loss_name]))
        ex.run(OPTIMIZER_STEP, StepContext(plan, step, optimizer_step=step + 1))
    elapsed = time.perf_counter() - start
    return {"tokens_per_s": args.steps * b * t / elapsed, "peak_rss_mib": peak_rss_mib(), "first_loss": losses[0],
            "arena_mib": sum(plan.arenas.values()) / 2**20}


def run_hf(work: Path, args: argparse.Namespace) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                                             target_modules=PROJ))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    batches = torch.load(work / "batches.pt")
    losses, start = [], 0.0
    for step, ids in enumerate(batches):
        if step == 1:
            start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
    elapsed = time.perf_counter() - start
    return {"tokens_per_s": args.steps * args.batch * args.seq / elapsed, "peak_rss_mib": peak_rss_mib(),
            "first_loss": losses[0]}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=5, help="timed steps (after one warm-up step)")
    p.add_argument("--threads", type=int, default=0, help="torch threads in each runner (0: torch's default)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=768)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--runner", choices=["ours", "hf"], help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def child(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    run = run_ours if args.runner == "ours" else run_hf
    print(json.dumps(run(Path(args.work), args)))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.runner:
        return child(args)
    with tempfile.TemporaryDirectory(prefix="surogate-bench-") as tmp:
        work = Path(tmp)
        build_job(work, args)
        results = {}
        for runner in ("ours", "hf"):
            cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--runner", runner,
                   "--work", str(work)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
            if proc.returncode != 0:
                print(proc.stderr[-4000:], file=sys.stderr)
                return proc.returncode
            results[runner] = json.loads(proc.stdout.strip().splitlines()[-1])
    ours, hf = results["ours"], results["hf"]
    tokens = args.batch * args.seq
    print(f"job: Qwen3-shaped hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, LoRA r{args.rank} on "
          f"{len(PROJ)} projections, seq {args.seq} x batch {args.batch} = {tokens} tokens/step, recompute on, "
          f"{args.steps} timed steps, threads {args.threads or torch.get_num_threads()}")
    print(f"{'runner':<22}{'tokens/s':>12}{'peak RSS MiB':>15}{'first loss':>12}")
    print(f"{'surogate (cpu arena)':<22}{ours['tokens_per_s']:>12.1f}{ours['peak_rss_mib']:>15.1f}"
          f"{ours['first_loss']:>12.4f}")
    print(f"{'transformers + peft':<22}{hf['tokens_per_s']:>12.1f}{hf['peak_rss_mib']:>15.1f}{hf['first_loss']:>12.4f}")
    print(f"ratios (surogate / HF): throughput x{ours['tokens_per_s'] / hf['tokens_per_s']:.2f}, "
          f"peak RSS x{ours['peak_rss_mib'] / hf['peak_rss_mib']:.2f}; surogate arena {ours['arena_mib']:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
