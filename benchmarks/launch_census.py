"""What one micro-step and one optimizer step launch, by plan op kind: Numba kernel launches, torch ops (views
and metadata not counted) and, among them, the copies (copy_, casts, clones) with their shapes.

    python benchmarks/launch_census.py [--model-size tiny|0.6b] [--full] [--lora-dtype bf16|fp32] [--json out.json]

Runs the throughput job's configuration (bf16, LoRA r16 on all seven projections, 8-bit AdamW, recompute,
packed rows) on the cuda backend's kernel table: on a GPU at the 0.6B shape, else on CPU tensors on a tiny
model (head_dim 128, so the fused norm + rope kernels take their 0.6B path) with NUMBA_ENABLE_CUDASIM=1. Counts
do not depend on the values: they say what the host asks for. Under the simulator the Numba kernels are counted
but not run (`--run-kernels` runs them: minutes), torch ops run for real. Two paths differ on CPU tensors and
are only counted right on a GPU: attention (CPU: SDPA with a dense bias and expanded GQA keys/values; GPU:
varlen flash) and mixed bf16/fp32 GEMMs of fp32 adapters (CPU: casts to fp32; GPU: the split bf16x3 route).
Eager launches cost ~5 us each of host time; with CUDA graphs that cost goes, the copies' traffic stays.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _gpu_job import SIZES, OurTrainer, our_config, packed_batches, save_preset_model  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

# torch ops that launch nothing: views, metadata, allocation (the arena's scratch views are not allocations)
NO_LAUNCH = {"view", "_unsafe_view", "reshape", "as_strided", "t", "transpose", "expand", "slice", "select",
             "unsqueeze", "squeeze", "permute", "alias", "detach", "split", "split_with_sizes", "unbind",
             "narrow", "_reshape_alias", "view_as_real", "lift_fresh", "empty", "empty_like", "empty_strided",
             "is_same_size", "_has_compatible_shallow_copy_type", "result_type", "unfold", "diagonal",
             "_local_scalar_dense", "expand_as", "view_as", "promote_types"}
COPIES = {"copy_", "_to_copy", "clone", "contiguous"}
OUTSIDE = "(executor)"  # torch work outside every op's kernel


@dataclass
class KindCensus:
    """One op kind's launches over one program run."""

    ops: int = 0
    numba: Counter = field(default_factory=Counter)  # kernel name -> launches
    torch: Counter = field(default_factory=Counter)  # aten op -> calls
    copies: Counter = field(default_factory=Counter)  # "op dtype[shape] <- dtype[shape]" -> calls

    def row(self) -> dict[str, Any]:
        return {"ops": self.ops, "numba": sum(self.numba.values()), "torch": sum(self.torch.values()),
                "copies": sum(self.copies.values()), "numba_kernels": dict(self.numba),
                "torch_ops": dict(self.torch), "copy_sites": dict(self.copies)}


def _desc(t: Any) -> str:
    if not isinstance(t, torch.Tensor):
        return type(t).__name__
    return f"{str(t.dtype).replace('torch.', '')}{list(t.shape)}"


class Census:
    """Counts launches per op kind while installed: wraps the executor's kernel table (which kind is running),
    every Numba launcher module's `launch` and torch's dispatcher (every torch op, views excepted)."""

    def __init__(self, run_kernels: bool = True) -> None:
        self.kinds: dict[str, KindCensus] = defaultdict(KindCensus)
        self.current = OUTSIDE
        self.run_kernels = run_kernels

    def wrap_table(self, table: dict) -> None:
        for kind, fn in list(table.items()):
            def wrapped(ins, attrs, ctx, _fn=fn, _kind=kind):
                self.current = _kind
                self.kinds[_kind].ops += 1
                try:
                    return _fn(ins, attrs, ctx)
                finally:
                    self.current = OUTSIDE
            table[kind] = wrapped

    def wrap_launchers(self) -> None:
        from surogate.numba_kernels import _device

        real = _device.launch

        def counted(kernel, grid, block, *args):
            name = getattr(getattr(kernel, "py_func", None), "__name__", None) or getattr(kernel, "__name__", "?")
            self.kinds[self.current].numba[name] += 1
            if self.run_kernels:
                real(kernel, grid, block, *args)

        counted.census = True  # a later census replaces this one
        for mod in _launcher_modules():
            if mod.launch is real or getattr(mod.launch, "census", False):
                mod.launch = counted

    def dispatch_mode(self) -> TorchDispatchMode:
        census = self

        class Counting(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func.overloadpacket.__name__
                if name not in NO_LAUNCH:
                    k = census.kinds[census.current]
                    k.torch[name] += 1
                    if name in COPIES:
                        src = _desc(args[1]) if name == "copy_" and len(args) > 1 else _desc(args[0])
                        dst = _desc(args[0]) if name == "copy_" else str((kwargs or {}).get("dtype", "")).replace(
                            "torch.", "")
                        k.copies[f"{name} {dst} <- {src}"] += 1
                return func(*args, **(kwargs or {}))

        return Counting()

    def table(self) -> dict[str, dict[str, Any]]:
        return {k: v.row() for k, v in sorted(self.kinds.items(), key=lambda kv: -(
            sum(kv[1].numba.values()) + sum(kv[1].torch.values())))}


def run_census(model_dir: Path, args: Any, device: str) -> dict[str, Any]:
    """Census of the second optimizer step (the first loads or compiles kernels and makes constants)."""
    from surogate.runtime.batches import plan_inputs
    from surogate.runtime.executor import MICRO_STEP, OPTIMIZER_STEP, StepContext

    args.eager = True  # counts what one replay contains; a graph replays exactly these launches
    trainer = OurTrainer(our_config(model_dir, args, **args.over), device=device)
    vocab = trainer.plan.tensors["model.embed_tokens.weight"].shape[0]
    flat = packed_batches(2 * args.accum, args.batch, args.seq, vocab)
    results = {}
    try:
        Census(args.run_kernels).wrap_launchers()
        trainer.train_step(flat[: args.accum])
        for program, batch in ((MICRO_STEP, flat[args.accum]), (OPTIMIZER_STEP, None)):
            if batch is not None:
                for name, value in plan_inputs(trainer.plan, batch, num_items=args.seq).items():
                    trainer.ex.write(name, value)
            census = Census(args.run_kernels)
            table = dict(trainer.ex.kernels)
            census.wrap_table(trainer.ex.kernels)
            census.wrap_launchers()
            try:
                with census.dispatch_mode():
                    trainer.ex.run(program, StepContext(trainer.plan, 1, optimizer_step=2))
            finally:
                trainer.ex.kernels.update(table)
            results[program] = census.table()
    finally:
        _restore_launchers()
    return results


def _launcher_modules() -> list[Any]:
    """The numba_kernels modules that launch through their own `launch` name, `_device` itself excepted: it keeps
    the real function, which every wrapper calls and _restore_launchers puts back."""
    import importlib
    import pkgutil

    import surogate.numba_kernels as pkg
    from surogate.numba_kernels import _device

    modules = (importlib.import_module(f"{pkg.__name__}.{info.name}") for info in pkgutil.iter_modules(pkg.__path__))
    return [mod for mod in modules if hasattr(mod, "launch") and mod is not _device]


def _restore_launchers() -> None:
    from surogate.numba_kernels import _device

    for mod in _launcher_modules():
        mod.launch = _device.launch


def totals(table: dict[str, dict[str, Any]]) -> dict[str, int]:
    return {key: sum(row[key] for row in table.values()) for key in ("ops", "numba", "torch", "copies")}


def print_table(program: str, table: dict[str, dict[str, Any]]) -> None:
    print(f"\n== {program}")
    print(f"{'op kind':<28}{'ops':>6}{'numba':>7}{'torch':>7}{'copies':>8}")
    for kind, row in table.items():
        print(f"{kind:<28}{row['ops']:>6}{row['numba']:>7}{row['torch']:>7}{row['copies']:>8}")
    t = totals(table)
    print(f"{'total':<28}{t['ops']:>6}{t['numba']:>7}{t['torch']:>7}{t['copies']:>8}")
    sites = [(kind, site, n) for kind, row in table.items() for site, n in row["copy_sites"].items()]
    if sites:
        print("copies:")
        for kind, site, n in sites:
            print(f"  {n:>4} x {kind}: {site}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-size", choices=["tiny", *SIZES], default=None,
                    help="tiny (default without a GPU) or a preset shape (default on a GPU: 0.6b)")
    ap.add_argument("--full", action="store_true", help="full fine-tune instead of LoRA")
    ap.add_argument("--lora-dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--layers", type=int, default=2, help="layers of the tiny model")
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--run-kernels", action=argparse.BooleanOptionalAction, default=None,
                    help="run the Numba kernels (default: on a GPU yes, under the simulator no)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    gpu = torch.cuda.is_available()
    if args.run_kernels is None:
        args.run_kernels = gpu
    size = args.model_size or ("0.6b" if gpu else "tiny")
    args.seq = args.seq or (2048 if size != "tiny" else 32)
    args.batch = args.batch or 2
    args.accum = 1
    args.over = {}
    with tempfile.TemporaryDirectory(prefix="surogate-census-") as tmp:
        model = Path(tmp) / "model"
        if size == "tiny":
            from tests.cuda_backend.helpers import save_qwen3

            save_qwen3(model, hidden_size=128, intermediate_size=192, num_hidden_layers=args.layers,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=128, vocab_size=64)
        else:
            save_preset_model(size, model)
        results = run_census(model, args, "cuda" if gpu else "cpu")
    for program, table in results.items():
        print_table(program, table)
    if not gpu:
        print("\n(CPU tensors: attention takes the SDPA path and fp32-adapter GEMMs the promote route; "
              "a GPU counts varlen flash and the split route)")
    if args.json:
        Path(args.json).write_text(json.dumps({"model_size": size, "device": "cuda" if gpu else "simulator",
                                               "programs": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    raise SystemExit(main())
