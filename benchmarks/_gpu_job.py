"""Shared pieces of the GPU benchmarks: the preset-shaped random model, the synthetic packed batches, and our
training step (cuda backend, CUDA graphs) on a compiled plan."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SIZES = {"0.6b": "Qwen/Qwen3-0.6B", "1.7b": "Qwen/Qwen3-1.7B", "4b": "Qwen/Qwen3-4B"}


def save_preset_model(size: str, out: Path) -> Path:
    """A random bf16 model with the preset architecture of `size` (nothing downloaded) plus a tiny tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from surogate.compiler.models.presets import find_preset

    _, cfg = find_preset(SIZES[size])
    config = AutoConfig.for_model(**cfg)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    return out


def packed_batches(n: int, batch: int, seq: int, vocab: int, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """Full rows of synthetic tokens, each row packed with documents of random lengths (positions restart)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (batch, seq), generator=g)
        pos = torch.empty(batch, seq, dtype=torch.int64)
        cu = [0]
        for r in range(batch):
            t = 0
            while t < seq:
                n_doc = min(seq - t, int(torch.randint(seq // 8, seq // 2 + 1, (1,), generator=g)))
                pos[r, t : t + n_doc] = torch.arange(n_doc)
                t += n_doc
                cu.append(r * seq + t)
        labels = ids.clone()
        starts = torch.tensor(cu[:-1])
        labels.view(-1)[starts] = -100  # a document's first token is never a target
        out.append({"input_ids": ids, "labels": labels, "position_ids": pos, "cu_seqlens": torch.tensor(cu)})
    return out


def our_config(model_dir: Path, args: Any, **over: Any):
    from surogate.schema import config_from_dict

    base = {"model": str(model_dir), "sequence_len": args.seq, "per_device_train_batch_size": args.batch,
            "gradient_accumulation_steps": args.accum, "torch_dtype": "bfloat16", "lora": not args.full,
            "lora_rank": 16, "lora_alpha": 32, "lora_dropout": getattr(args, "lora_dropout", 0.0), "lora_dtype": getattr(args, "lora_dtype", "bf16"),
            "optimizer": "adamw_8bit", "recompute": not getattr(args, "no_recompute", False),
            "learning_rate": 1e-4, "use_cuda_graphs": not args.eager,
            "lmhead_chunks": getattr(args, "lmhead_chunks", 1), "recipe": getattr(args, "recipe", "bf16") or "bf16"}
    base.update(over)
    return config_from_dict(base)


class OurTrainer:
    """compile_plan -> ArenaExecutor(cuda table) on the GPU -> GraphRunner; one call = one optimizer step."""

    def __init__(self, cfg: Any, device: str = "cuda", backend: str = "cuda") -> None:
        from surogate.compiler.pipeline import compile_plan
        from surogate.runtime.backends import kernel_table
        from surogate.runtime.cuda_graphs import install
        from surogate.runtime.executor import ArenaExecutor
        from surogate.runtime.reference import load_weights
        from surogate.runtime.trainer import loss_tensor, norm_gradient_names
        from surogate.runtime.weights import initialise

        self.cfg = cfg
        self.plan = compile_plan(cfg)
        self.loss_name = loss_tensor(self.plan)
        self.ex = ArenaExecutor(self.plan, kernel_table(backend), device=device, watch=[self.loss_name])
        initialise(self.ex, load_weights(self.plan, cfg.model, lora_seed=0))
        self.graphs = install(self.ex, enabled=bool(cfg.use_cuda_graphs))
        self.step = 0
        self.world = 1  # Trainer.gradient_norm reads it, with the gradient list Trainer.__init__ makes
        self._norm_gradients = norm_gradient_names(self.plan, self.ex)
        self.accumulation = int(cfg.gradient_accumulation_steps)  # Trainer._keep_micro_loss reads these two
        self._micro_losses = None

    def gradient_norm(self) -> float:
        from surogate.runtime.trainer import Trainer

        return Trainer.gradient_norm(self)  # type: ignore[arg-type]  # the loop's own computation

    def train_step(self, micro_batches: list[dict]) -> float:
        from surogate.runtime.batches import plan_inputs
        from surogate.runtime.executor import MICRO_STEP, OPTIMIZER_STEP, StepContext
        from surogate.runtime.trainer import Trainer

        total = max(sum(int((b["labels"] != -100).sum()) for b in micro_batches), 1)
        self.ex.zero_gradients()
        for i, b in enumerate(micro_batches):
            for name, value in plan_inputs(self.plan, b, num_items=total).items():
                self.ex.write(name, value)
            self.ex.run(MICRO_STEP, StepContext(self.plan, self.step * len(micro_batches) + i))
            # the loop's own device-side copy: one host read per step, as in training (no sync per micro-step)
            Trainer._keep_micro_loss(self, i, len(micro_batches))  # type: ignore[arg-type]
        loss = float(self._micro_losses[: len(micro_batches)].sum())
        self.grad_norm = self.gradient_norm()  # the training loop reads it every step (logging, non-finite skip)
        self.ex.run(OPTIMIZER_STEP, StepContext(self.plan, self.step, optimizer_step=self.step + 1))
        self.step += 1
        return loss


def timed(fn, warmup: int, steps: int) -> tuple[float, list[float]]:
    """(seconds for `steps` calls after `warmup` calls, every call's return value)."""
    values = [fn(i) for i in range(warmup)]
    torch.cuda.synchronize()
    start = time.perf_counter()
    values += [fn(warmup + i) for i in range(steps)]
    torch.cuda.synchronize()
    return time.perf_counter() - start, values
