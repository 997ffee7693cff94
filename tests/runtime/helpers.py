"""Shared helpers of the runtime tests: tiny random HF models, tiny text data, configs, and a driver that runs a
compiled plan's micro-step through the ArenaExecutor and reads back loss and gradients."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch

from surogate.compiler.ir import Role
from surogate.compiler.pipeline import compile_plan
from surogate.compiler.plan import Plan
from surogate.runtime.backends import kernel_table
from surogate.runtime.batches import plan_inputs
from surogate.runtime.executor import MICRO_STEP, ArenaExecutor, StepContext
from surogate.runtime.trainer import loss_tensor
from surogate.runtime.weights import initialise
from surogate.schema import config_from_dict
from tests.compiler_front.helpers import rel_err  # noqa: F401 - re-exported for the tests
from tests.runtime_support.helpers import VOCAB, save_tiny_tokenizer

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TINY = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256, rms_norm_eps=1e-6,
            bos_token_id=1, eos_token_id=2, pad_token_id=0)


def hf_config(family: str, tie: bool = False, **over: Any):
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    kw = {**TINY, "tie_word_embeddings": tie, **over}
    head_dim = {"head_dim": kw.pop("head_dim", 8)}
    if family == "llama":
        return LlamaConfig(**kw, **head_dim)
    if family == "qwen2":
        return Qwen2Config(**kw)
    if family == "qwen3":
        return Qwen3Config(**kw, **head_dim)
    if family == "qwen3_moe":
        from transformers import Qwen3MoeConfig

        return Qwen3MoeConfig(**kw, **head_dim, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                              norm_topk_prob=True)
    raise ValueError(family)


def save_model(out: Path, family: str = "qwen3", tie: bool = False, seed: int = 0, **over: Any) -> Path:
    """A random fp32 model (non-trivial norm weights) + a word-level tokenizer saved under `out`."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(family, tie, **over), dtype=torch.float32)
    with torch.no_grad():  # norm weights != 1 so their gradients are checked meaningfully
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(out, safe_serialization=True)
    save_tiny_tokenizer(out)
    return out


def write_text_data(path: Path, rows: int = 64, seed: int = 0, min_words: int = 4, max_words: int = 14) -> Path:
    """A jsonl text dataset over the tiny tokenizer's words (with a learnable pattern: counting up)."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(rows):
            start, n = rng.randrange(80), rng.randrange(min_words, max_words)
            f.write(json.dumps({"text": " ".join(f"w{(start + i) % 92}" for i in range(n))}) + "\n")
    return path


def make_cfg(model_dir: Path | str, **over: Any):
    """A validated TrainConfig for the tiny models (fp32, no packing surprises, nothing GPU-only)."""
    base = dict(model=str(model_dir), sequence_len=16, per_device_train_batch_size=2,
                gradient_accumulation_steps=1, torch_dtype="float32", lora=False, recompute=False,
                lora_dropout=0.0, use_cuda_graphs=False)
    base.update(over)
    return config_from_dict(base)


class PlanRunner:
    """compile_plan(cfg) -> ArenaExecutor on the cpu backend, weights loaded from the model folder."""

    def __init__(self, cfg: Any, weights: dict[str, torch.Tensor] | None = None, plan: Plan | None = None) -> None:
        from surogate.runtime.reference import load_weights

        self.cfg = cfg
        self.plan = plan if plan is not None else compile_plan(cfg)
        self.loss_name = loss_tensor(self.plan)
        self.ex = ArenaExecutor(self.plan, kernel_table("cpu"), watch=[self.loss_name])
        values = load_weights(self.plan, cfg.model, lora_seed=int(cfg.train_seed))
        values.update(weights or {})
        initialise(self.ex, values)

    def micro_step(self, ids: torch.Tensor, labels_hf: torch.Tensor, *, position_ids: torch.Tensor | None = None,
                   cu_seqlens: torch.Tensor | None = None, num_items: int | None = None,
                   step: int = 0, loss_weights: torch.Tensor | None = None) -> tuple[float, dict[str, torch.Tensor]]:
        """One micro-step from zeroed gradients: (loss, {weight name: gradient}). Plan weight names are the HF
        names (LoRA: PEFT's without the `base_model.model.` prefix and the adapter name)."""
        b, t = ids.shape
        batch = {"input_ids": ids, "labels": labels_hf,
                 "position_ids": position_ids if position_ids is not None else torch.arange(t).expand(b, t),
                 "cu_seqlens": cu_seqlens if cu_seqlens is not None else torch.arange(0, b * t + 1, t)}
        if loss_weights is not None:  # HF-aligned per-token weights (a custom loss_scale)
            batch["loss_weights"] = loss_weights
        self.ex.zero_gradients()
        for name, value in plan_inputs(self.plan, batch, num_items=num_items).items():
            self.ex.write(name, value)
        self.ex.run(MICRO_STEP, StepContext(self.plan, step))
        return float(self.ex.observed[self.loss_name]), self.gradients()

    def evaluate(self, ids: torch.Tensor, labels_hf: torch.Tensor) -> float:
        """The loss of the plan's evaluation program on whole rows (no dropout, `StepContext.training` False)."""
        from surogate.runtime.trainer import eval_program

        b, t = ids.shape
        self.ex.programs.setdefault("eval", eval_program(self.plan))
        batch = {"input_ids": ids, "labels": labels_hf, "position_ids": torch.arange(t).expand(b, t),
                 "cu_seqlens": torch.arange(0, b * t + 1, t)}
        for name, value in plan_inputs(self.plan, batch).items():
            self.ex.write(name, value)
        self.ex.run("eval", StepContext(self.plan, 0, training=False))
        return float(self.ex.observed[self.loss_name])

    def gradients(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, t in self.plan.tensors.items():
            if t.role is Role.GRADIENT and name in self.ex.views:
                out[t.attrs["grad_of"]] = self.ex.views[name].clone()
        return out

    def trainable(self) -> dict[str, torch.Tensor]:
        """Plan name -> current value of every trainable weight."""
        return {n: v.clone() for n, v in self.ex.tensors_of([Role.TRAINABLE_WEIGHT]).items()}


def peft_name(name: str) -> str:
    """PEFT parameter name -> the plain HF-style name our plans use as `source`."""
    return name.removeprefix("base_model.model.").replace(".default.", ".")


def random_batch(b: int, t: int, seed: int = 1, low: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids (by default no special tokens: HF gives the pad row no embedding gradient, see
    test_parity's pad-row test) and HF-style labels with the first 3 positions ignored."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(low, VOCAB, (b, t), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100
    return ids, labels


def build_trainer(cfg: Any, plan: Plan | None = None):
    """The Trainer `run_training` builds (plan, data, executor, initial weights), without observer or loop."""
    from surogate.compiler.models import resolve_model
    from surogate.runtime.data import load_tokenizer, prepare_datasets
    from surogate.runtime.trainer import Trainer
    from surogate.runtime.weights import initial_weights

    spec = resolve_model(cfg)
    plan = plan if plan is not None else compile_plan(cfg)
    torch.manual_seed(int(cfg.train_seed))
    data = prepare_datasets(cfg, load_tokenizer(cfg))
    ex = ArenaExecutor(plan, kernel_table("cpu"))
    initialise(ex, initial_weights(plan, cfg, spec.source_dir, spec.hf_config))
    return Trainer(cfg, plan, ex, data)


def text_cfg(model_dir: Path, data_file: Path, out: Path, **over: Any):
    """A training config on a text dataset (no validation split unless asked)."""
    base = dict(datasets=[{"path": str(data_file), "type": "text"}], output_dir=str(out),
                validation_split_ratio=0.0, max_steps=2, save_steps=1000, learning_rate=1e-3,
                log_file=str(out / "log.jsonl"))
    base.update(over)
    return make_cfg(model_dir, **base)


def cli_env() -> dict[str, str]:
    """Environment of a `surogate` subprocess: one thread (fast on a busy machine, and the same arithmetic in
    every run so results can be compared bitwise), offline."""
    import os

    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}


def surogate_cmd(*args: str) -> list[str]:
    """The installed `surogate` console script beside this interpreter (else `python -m surogate.cli`)."""
    import sys

    script = Path(sys.executable).parent / "surogate"
    return [str(script), *args] if script.is_file() else [sys.executable, "-m", "surogate.cli", *args]


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300):
    """`surogate ARGS` to completion (a CompletedProcess). In its own process group: on a timeout the whole group
    is killed, so no rank or helper it started keeps the output pipes open and wedges the test run."""
    import os
    import signal
    import subprocess

    with subprocess.Popen(surogate_cmd(*args), cwd=cwd, env=cli_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            raise AssertionError(f"surogate {' '.join(args)} did not finish in {timeout:.0f} s; "
                                 f"stderr tail:\n{err[-3000:]}") from None
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def write_yaml(path: Path, cfg: dict[str, Any]) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def yaml_cfg(model_dir: Path, data_file: Path, out: Path, **over: Any) -> dict[str, Any]:
    """A config dict for the CLI on the tiny model and text data."""
    base = dict(model=str(model_dir), sequence_len=16, per_device_train_batch_size=2, gradient_accumulation_steps=1,
                torch_dtype="float32", lora=True, lora_rank=4, lora_alpha=8, lora_dropout=0.0, recompute=False,
                use_cuda_graphs=False, datasets=[{"path": str(data_file), "type": "text"}],
                validation_split_ratio=0.0, output_dir=str(out), log_file=str(out / "log.jsonl"), max_steps=4,
                save_steps=1000, learning_rate=1e-3)
    base.update(over)
    return base


def eval_batches(cfg: Any) -> list[dict]:
    """The evaluation batches `Trainer.evaluate` reads for `cfg` (same data preparation, same order)."""
    from surogate.runtime.data import load_tokenizer, prepare_datasets

    data = prepare_datasets(cfg, load_tokenizer(cfg))
    assert data.eval is not None, "the config has no evaluation split"
    return list(data.eval.batches(int(cfg.per_device_train_batch_size), epoch=0, seed=int(cfg.eval_seed),
                                  shuffle=False))


@torch.no_grad()
def hf_eval(model: Any, batches: list[dict]) -> tuple[float, list[torch.Tensor]]:
    """(token-weighted mean loss, logits per batch) of a HF model on unpacked right-padded batches: each row
    is one document then a padding segment, so the attention mask is "same segment as the first token"."""
    model.eval()
    total, count, logits = 0.0, 0, []
    for b in batches:
        n = int(b["num_loss_tokens"])
        if n == 0:
            continue
        docs = torch.as_tensor(b["document_ids"])
        mask = (docs == docs[:, :1]).long()
        out = model(input_ids=torch.as_tensor(b["input_ids"]), attention_mask=mask, labels=torch.as_tensor(b["labels"]))
        total += float(out.loss) * n
        count += n
        logits.append(out.logits.masked_fill(~mask.bool()[..., None], 0.0))
    return total / count, logits


def trainer_loss(trainer: Any, ids: torch.Tensor, labels_hf: torch.Tensor) -> float:
    """The Trainer's forward-only ("eval") program on one batch of unpacked rows."""
    b, t = ids.shape
    batch = {"input_ids": ids, "labels": labels_hf, "position_ids": torch.arange(t).expand(b, t),
             "cu_seqlens": torch.arange(0, b * t + 1, t)}
    for name, value in plan_inputs(trainer.plan, batch).items():
        trainer.ex.write(name, value)
    trainer.ex.run("eval", StepContext(trainer.plan, 0))
    return float(trainer.ex.observed[trainer.loss_name])
