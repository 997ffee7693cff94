"""Tiny Qwen3 models and a runner that executes one compiled plan through two kernel tables (the cpu
backend and the cuda backend) with identical weights and batches."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from surogate.compiler.ir import Role
from surogate.compiler.pipeline import compile_plan
from surogate.runtime.backends import kernel_table
from surogate.runtime.batches import plan_inputs
from surogate.runtime.executor import MICRO_STEP, OPTIMIZER_STEP, ArenaExecutor, StepContext
from surogate.runtime.trainer import loss_tensor
from surogate.runtime.weights import initialise
from tests.runtime.helpers import make_cfg, rel_err, save_model

VOCAB = 64
# Small enough for the simulator (every Numba thread is a Python thread): hidden 32, 4 query / 2 kv heads.
SIM_MODEL = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=VOCAB)


def save_sim_model(out: Path, seed: int = 0, **over: Any) -> Path:
    return save_model(out, "qwen3", seed=seed, **{**SIM_MODEL, **over})


def save_qwen3(out: Path, seed: int = 0, **config: Any) -> Path:
    """A random fp32 Qwen3 of any shape (head_dim included) + the tiny tokenizer, saved under `out`."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    from tests.runtime_support.helpers import save_tiny_tokenizer

    torch.manual_seed(seed)
    kw = dict(max_position_embeddings=4096, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0,
              tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(Qwen3Config(**{**kw, **config}), dtype=torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    save_tiny_tokenizer(out)
    return out


def sim_cfg(model_dir: Path, seq: int = 8, batch: int = 1, **over: Any):
    return make_cfg(model_dir, sequence_len=seq, per_device_train_batch_size=batch, **over)


def batch(b: int, t: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids below VOCAB (no special tokens) and HF-style labels with the first 2 positions ignored."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (b, t), generator=g)
    labels = ids.clone()
    labels[:, :2] = -100
    return ids, labels


class Runner:
    """One plan, one executor on the given backend's kernel table, weights from the model folder."""

    def __init__(self, cfg: Any, backend: str, plan: Any = None, device: str = "cpu",
                 weights: dict[str, torch.Tensor] | None = None) -> None:
        from surogate.runtime.reference import load_weights

        self.cfg = cfg
        self.plan = plan if plan is not None else compile_plan(cfg)
        self.loss_name = loss_tensor(self.plan)
        self.kernels = kernel_table(backend)
        self.ex = ArenaExecutor(self.plan, self.kernels, device=device, watch=[self.loss_name])
        values = load_weights(self.plan, cfg.model, lora_seed=int(cfg.train_seed))
        values.update(weights or {})
        # host tensors, copied into the arena one by one as the training session does (device copies of every
        # weight made first would add the whole model to the device peak while loading)
        initialise(self.ex, values)
        self.device = device

    def write_batch(self, ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor | None = None,
                    cu_seqlens: torch.Tensor | None = None, loss_weights: torch.Tensor | None = None) -> None:
        b, t = ids.shape
        data = {"input_ids": ids, "labels": labels,
                "position_ids": position_ids if position_ids is not None else torch.arange(t).expand(b, t),
                "cu_seqlens": cu_seqlens if cu_seqlens is not None else torch.arange(0, b * t + 1, t)}
        if loss_weights is not None:  # HF-aligned per-token weights (a custom loss_scale)
            data["loss_weights"] = loss_weights
        for name, value in plan_inputs(self.plan, data).items():
            self.ex.write(name, value)  # host values: copied into the arena views (no device allocation)

    def micro_step(self, ids: torch.Tensor, labels: torch.Tensor, step: int = 0, **kw: Any):
        self.ex.zero_gradients()
        self.write_batch(ids, labels, **kw)
        self.ex.run(MICRO_STEP, StepContext(self.plan, step))
        return float(self.ex.observed[self.loss_name]), self.gradients()

    def optimizer_step(self, step: int = 0, lr_scale: float = 1.0) -> None:
        self.ex.run(OPTIMIZER_STEP, StepContext(self.plan, step, lr_scale=lr_scale, optimizer_step=step + 1))

    def gradients(self) -> dict[str, torch.Tensor]:
        self.ex.synchronize()  # offloaded gradients: their stores run on the copy stream
        return {t.attrs["grad_of"]: self.ex.views[n].detach().cpu().clone()
                for n, t in self.plan.tensors.items() if t.role is Role.GRADIENT and n in self.ex.views}

    def trainable(self) -> dict[str, torch.Tensor]:
        return {n: v.detach().cpu().clone() for n, v in self.ex.tensors_of([Role.TRAINABLE_WEIGHT]).items()}


def lora_b_weights(plan: Any, seed: int = 7) -> dict[str, torch.Tensor]:
    """Random LoRA B matrices (the default B = 0 would leave every A gradient zero)."""
    g = torch.Generator().manual_seed(seed)
    return {n: 0.1 * torch.randn(t.shape, generator=g) for n, t in plan.tensors.items()
            if t.role is Role.TRAINABLE_WEIGHT and "lora_B" in n}


def pair(cfg: Any) -> tuple[Runner, Runner]:
    """(cpu runner, cuda-table runner) on the same compiled plan and weights."""
    plan = compile_plan(cfg)
    weights = lora_b_weights(plan)
    return Runner(cfg, "cpu", plan=plan, weights=weights), Runner(cfg, "cuda", plan=plan, weights=weights)


def assert_close_grads(grads: dict, ref: dict, tol: float) -> None:
    assert set(grads) == set(ref) and ref
    for name, g in ref.items():
        assert g.abs().sum() > 0, f"{name}: reference gradient is zero, the check would be vacuous"
        err = rel_err(grads[name], g)
        assert err < tol, f"{name}: rel err {err:.2e}"


__all__ = ["VOCAB", "Runner", "assert_close_grads", "batch", "lora_b_weights", "pair", "rel_err", "save_model",
           "save_sim_model", "sim_cfg"]


def record_copies(runner: Runner) -> list[str]:
    """Wrap the runner's kernels; the returned list collects outputs a kernel did not write in place."""
    copied: list[str] = []
    ex = runner.ex
    ops = {id(op.attrs): op for op in runner.plan.ops}
    for kind, fn in list(ex.kernels.items()):
        def wrapped(ins, attrs, ctx, fn=fn):
            outs = fn(ins, attrs, ctx)
            for name, value in zip(ops[id(attrs)].outputs, outs, strict=True):
                view = ex.views[name]
                if value is not None and (value.data_ptr() != view.data_ptr() or value.shape != view.shape):
                    copied.append(name)
            return outs
        ex.kernels[kind] = wrapped
    return copied


def reference_kernels(monkeypatch: Any, keep: tuple[str, ...] = ()) -> None:
    """Run every Numba kernel as its reference (identical signatures; each kernel is checked against its
    reference under the simulator in tests/kernels), except those whose name starts with one of `keep`: for
    tests whose subject is the backend's routing and buffers, where simulated RMSNorm or CE threads only cost
    time (a simulated GPU thread is a Python thread)."""
    from surogate.numba_kernels import KERNELS, KernelPair

    for name, kp in list(KERNELS.items()):
        if not name.startswith(keep):
            monkeypatch.setitem(KERNELS, name, KernelPair(reference=kp.reference, cuda=kp.reference))
