"""The floor of a training step: every op of a compiled plan at the GPU's peak (tensor-core FLOP/s or DRAM
bandwidth, whichever binds it), per op kind. No GPU needed: the plan comes from the preset architecture.

    python benchmarks/roofline.py [--model-size 0.6b] [--full] [--lora-dtype bf16|fp32] [--no-recompute]
                                  [--gpu h100|h200] [--json out.json]

Tokens/s at the floor bound every implementation of this program on that GPU; the throughput target's share of
it says what efficiency the target needs. `op_profile.py` prints the same floors beside measured op times on a
GPU (floor / measured = how close each op kind runs to its peak: where the next millisecond is).

Cost model (the minimum any implementation moves or computes):
- bytes: each input read once, each output written once (an accumulated output read too); outputs no op
  reads (workspaces: scratch; and the loss, lse) are not counted, except the LM head's logits chunks: written by the logits GEMM, read and
  written in place by the CE kernel(s) (two reads for the fused forward + gradient pass), read by the dX (and
  dW) GEMMs;
- FLOPs: GEMM kinds 2 x M x N x K; attention 4 x heads x head_dim x (query, key) pairs in the forward and 2.5
  times that in the backward (five products instead of two), pairs = sum over documents of L(L+1)/2 (causal,
  packed documents; whole rows when no lengths are given); elementwise kinds 0 (bandwidth-bound).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Datasheet peaks (SXM): DRAM bytes/s, dense bf16 tensor-core FLOP/s, fp32 (no TF32) FLOP/s.
PEAKS = {"h100": (3.35e12, 989e12, 67e12), "h200": (4.8e12, 989e12, 67e12)}
TARGET_TOKENS_PER_S = 54_000  # issue 7's H100 target for the Qwen3-0.6B LoRA job
_GEMM = ("linear", "linear_bwd_data", "linear_bwd_weight")
_STACKED = ("linear_stacked", "linear_stacked_bwd_data", "linear_stacked_bwd_weight")
_ALL_GEMM = _GEMM + _STACKED
# LM-head kinds: (passes over the logits, logits-sized GEMMs), the dW GEMM's of each aside
_CE = {"lm_head_ce": (2, 1), "lm_head_ce_bwd": (4, 2), "lm_head_ce_fwd_bwd": (5, 2)}


@dataclass(frozen=True)
class Peak:
    bandwidth: float  # bytes/s
    flops_16: float  # bf16/fp16 tensor-core FLOP/s
    flops_32: float  # fp32 FLOP/s

    @classmethod
    def of(cls, gpu: str) -> Peak:
        return cls(*PEAKS[gpu])


def _t(plan: Any, name: str) -> Any:
    return plan.tensors[name]


def _gemm_flops(plan: Any, op: Any) -> float:
    a, b = _t(plan, op.inputs[0]), _t(plan, op.inputs[1])
    if op.kind in _STACKED:  # 2 x rows x (the first input's width) x (the other side's: the output's or x's)
        other = b if op.kind == "linear_stacked_bwd_weight" else _t(plan, op.outputs[0])
        return 2.0 * math.prod(a.shape[:-1]) * a.shape[-1] * other.shape[-1]
    rows = math.prod(a.shape[:-1])
    if op.kind in ("linear", "linear_bwd_data"):  # x [.., in] @ W[out, in]^T, dy [.., out] @ W[out, in]
        return 2.0 * rows * b.shape[0] * b.shape[1]
    return 2.0 * rows * a.shape[-1] * b.shape[-1]  # dW = dy^T [out, rows] @ x [rows, in]


def causal_pairs(rows: int, seq: int, doc_lengths: Sequence[int] | None) -> float:
    """(query, key) pairs one head attends over a micro-batch: documents' L(L+1)/2, or whole rows of `seq`."""
    if doc_lengths:
        return float(sum(n * (n + 1) // 2 for n in doc_lengths))
    return rows // seq * seq * (seq + 1) / 2


def op_cost(plan: Any, op: Any, pairs: float | None = None, read: frozenset | None = None) -> tuple[float, float]:
    """(bytes, FLOPs) of one op at the floor (module doc); `pairs`: an attention head's (query, key) pairs in one
    micro-batch (None: causal whole rows); `read`: `read_set(plan)` when the caller has it."""
    acc = set(op.attrs.get("accumulate_into") or ())
    read = read_set(plan) if read is None else read
    from surogate.compiler.ir import view_root

    outs = [n for n in op.outputs if n in read or view_root(plan.tensors, n) in read]  # (a column of a read parent)
    nbytes = float(sum(_t(plan, n).nbytes for n in op.inputs) + sum(_t(plan, n).nbytes for n in outs)
                   + sum(_t(plan, n).nbytes for n in outs if n in acc))
    if op.kind == "embedding":  # reads the looked-up rows, not the table
        nbytes = 2.0 * _t(plan, op.outputs[0]).nbytes + _t(plan, op.inputs[0]).nbytes
    if op.kind in _ALL_GEMM:
        return nbytes, _gemm_flops(plan, op)
    if op.kind in _CE:
        x, w = _t(plan, op.inputs[0]), _t(plan, op.inputs[1])
        rows, (vocab, hidden) = math.prod(x.shape[:-1]), w.shape
        dw = 1 in tuple(op.attrs.get("wrt", ()))
        passes, gemms = _CE[op.kind]
        logit_bytes = rows * vocab * (x.nbytes // x.numel)
        return nbytes + logit_bytes * (passes + dw), 2.0 * rows * vocab * hidden * (gemms + dw)
    if op.kind in ("attention", "attention_bwd"):
        q = _t(plan, op.inputs[0 if op.kind == "attention" else 1])
        b, t = q.shape[0], q.shape[1]
        pairs = causal_pairs(b * t, t, None) if pairs is None else pairs
        fwd = 4.0 * op.attrs["num_heads"] * op.attrs["head_dim"] * pairs
        return nbytes, fwd * (2.5 if op.kind == "attention_bwd" else 1.0)
    return nbytes, 0.0


def read_set(plan: Any) -> frozenset:
    """Tensors some op of `plan` reads (a column view read reads its parent's memory)."""
    from surogate.compiler.ir import view_parent

    read = {n for op in plan.ops for n in op.inputs}
    for n in list(read):  # (views nest: a read of h reads [x | h]'s memory, its parent's parent)
        while (n := view_parent(plan.tensors[n])) is not None:
            read.add(n)
    return frozenset(read)


def _flops_peak(plan: Any, op: Any, peak: Peak) -> float:
    wide = any(_t(plan, n).dtype == "fp32" for n in op.inputs[:2])
    return peak.flops_32 if wide and op.kind in _ALL_GEMM else peak.flops_16


@dataclass
class KindFloor:
    calls: int = 0
    bytes: float = 0.0
    flops: float = 0.0
    seconds: float = 0.0


def step_floor(plan: Any, peak: Peak, accumulation: int, doc_lengths: Sequence[int] | None = None
               ) -> dict[str, KindFloor]:
    """Per op kind, one optimizer step: the micro-step ops `accumulation` times, the optimizer's once.
    `doc_lengths`: the documents of the whole step (all micro-batches; None: causal whole rows)."""
    pairs = None if not doc_lengths else causal_pairs(0, 1, doc_lengths) / accumulation
    out: dict[str, KindFloor] = defaultdict(KindFloor)
    read = read_set(plan)
    for op in plan.ops:
        reps = accumulation if op.phase in ("forward", "backward") else 1
        nbytes, flops = op_cost(plan, op, pairs, read)
        k = out[op.kind]
        k.calls += reps
        k.bytes += reps * nbytes
        k.flops += reps * flops
        k.seconds += reps * max(nbytes / peak.bandwidth, flops / _flops_peak(plan, op, peak))
    return dict(out)


def device_floors(plan: Any, micro_batches: list[dict]) -> dict[str, KindFloor]:
    """`step_floor` on the current CUDA device (H100 / H200 datasheet peaks; {} on another card) for one step of
    `micro_batches` (their `cu_seqlens` give the documents)."""
    import torch

    name = torch.cuda.get_device_name().lower()
    gpu = next((g for g in PEAKS if g in name), None)
    if gpu is None:
        return {}
    docs = [int(n) for mb in micro_batches for n in torch.diff(mb["cu_seqlens"]).tolist()]
    return step_floor(plan, Peak.of(gpu), len(micro_batches), doc_lengths=docs)


def _job(args: argparse.Namespace) -> Any:
    from surogate.compiler.pipeline import compile_plan
    from surogate.schema import config_from_dict

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _gpu_job import SIZES

    return compile_plan(config_from_dict({
        "model": SIZES[args.model_size], "sequence_len": args.seq, "per_device_train_batch_size": args.batch,
        "gradient_accumulation_steps": args.accum, "torch_dtype": "bfloat16", "lora": not args.full,
        "lora_rank": 16, "lora_alpha": 32, "lora_dropout": 0.0, "lora_dtype": args.lora_dtype,
        "optimizer": "adamw_8bit", "recompute": not args.no_recompute, "use_cuda_graphs": True}))


def report(floors: dict[str, KindFloor], tokens: int) -> tuple[list[str], dict]:
    total = sum(k.seconds for k in floors.values())
    lines = [f"{'op kind':<22}{'calls':>7}{'GB':>9}{'TFLOP':>8}{'floor ms':>10}{'share':>8}"]
    for kind, k in sorted(floors.items(), key=lambda kv: -kv[1].seconds):
        lines.append(f"{kind:<22}{k.calls:>7}{k.bytes / 1e9:>9.2f}{k.flops / 1e12:>8.2f}"
                     f"{k.seconds * 1e3:>10.2f}{k.seconds / total:>8.1%}")
    tps = tokens / total
    lines.append(f"step floor {total * 1e3:.1f} ms -> {tps:,.0f} tokens/s; {TARGET_TOKENS_PER_S:,} tokens/s needs "
                 f"{TARGET_TOKENS_PER_S / tps:.0%} of the floor")
    data = {"step_floor_ms": total * 1e3, "tokens_per_s_at_floor": tps,
            "kinds": {k: vars(v) for k, v in floors.items()}}
    return lines, data


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-size", choices=["0.6b", "1.7b", "4b"], default="0.6b")
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--lora-dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--no-recompute", action="store_true")
    ap.add_argument("--gpu", choices=list(PEAKS), default="h100")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--accum", type=int, default=4)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    plan = _job(args)
    lines, data = report(step_floor(plan, Peak.of(args.gpu), args.accum), args.seq * args.batch * args.accum)
    print(f"{args.model_size} {'full' if args.full else 'LoRA ' + args.lora_dtype}, recompute "
          f"{not args.no_recompute}, {args.gpu} peaks (attention over whole rows: packed documents attend less)")
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps(data, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
