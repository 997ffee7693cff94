"""fp32 adapters' bf16x3 parts kept across micro-steps (`CudaState.kept_split`, SUROGATE_SPLIT_CACHE "step", the
default): each adapter weight is split at its first GEMM, then again only when it is written (the optimizer
step, through the executor's `weights_written` hook, or `ArenaExecutor.write`), so micro-steps split nothing.
Trained through the cuda table on CPU tensors with the split route forced on (a GPU's; the fp32-output GEMM
emulated) and every Numba kernel as its reference (the kernels are checked against those elsewhere; here the
subject is when the parts are rewritten): bit for bit what a split at every GEMM gives."""

from __future__ import annotations

import pytest
import torch

from surogate.runtime.backends import cuda_split_gemm as csg
from surogate.runtime.backends.cuda_sizes import SPLIT_CACHE_TAG
from surogate.runtime.backends.cuda_state import CudaKernels
from surogate.runtime.executor import MICRO_STEP, StepContext
from tests.cuda_backend.helpers import (
    Runner,
    batch,
    lora_b_weights,
    reference_kernels,
    save_sim_model,
    sim_cfg,
)

CFG = dict(torch_dtype="bfloat16", lora=True, lora_rank=4, lora_alpha=8, lora_dropout=0.1, recompute=True,
           learning_rate=1e-2, max_grad_norm=1.0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_sim_model(tmp_path_factory.mktemp("split_cache") / "qwen3")


@pytest.fixture
def splits(monkeypatch):
    """The split route on, every Numba kernel as its reference; returns the list of parts buffers split into
    (one data pointer per split)."""
    monkeypatch.setattr(csg, "split_enabled", lambda device: True)
    reference_kernels(monkeypatch)
    seen: list[int] = []
    real = csg.split3
    monkeypatch.setattr(csg, "split3", lambda f, parts: (seen.append(parts.data_ptr()), real(f, parts)))
    return seen


def _kept_buffers(r: Runner) -> set[int]:
    return {buf.data_ptr() for (tag, *_), buf in r.kernels.state._scratch.items() if tag.startswith(SPLIT_CACHE_TAG)}


def _train(r: Runner, seen: list[int], steps: int = 2, micro: int = 2, rewrite: dict | None = None):
    """`steps` optimizer steps of `micro` micro-steps; `rewrite` written into the arena before the last step.
    Returns (losses, per micro-step gradients, trainable weights after each step, (what ran, the buffers it split
    into) per program run and write)."""
    losses, grads, weights, counts = [], [], [], []
    for step in range(steps):
        if rewrite and step == steps - 1:
            for name, value in rewrite.items():
                r.ex.write(name, value)
            counts.append(("write", list(seen)))
            seen.clear()
        r.ex.zero_gradients()
        for m in range(micro):
            ids, labels = batch(1, 8, seed=10 * step + m)
            r.write_batch(ids, labels)
            r.ex.run(MICRO_STEP, StepContext(r.plan, step))
            losses.append(float(r.ex.observed[r.loss_name]))
            grads.append(r.gradients())
            counts.append(("micro", list(seen)))
            seen.clear()
        r.optimizer_step(step)
        weights.append(r.trainable())
        counts.append(("optimizer", list(seen)))
        seen.clear()
    return losses, grads, weights, counts


def _same(a, b) -> bool:
    la, ga, wa, _ = a
    lb, gb, wb, _ = b
    return (la == lb and all(torch.equal(x[n], y[n]) for x, y in zip(ga, gb, strict=True) for n in x)
            and all(torch.equal(x[n], y[n]) for x, y in zip(wa, wb, strict=True) for n in x))


def test_parts_are_split_when_the_weights_change_not_per_micro_step(model_dir, splits, monkeypatch):
    cfg = sim_cfg(model_dir, batch=1, seq=8, **CFG)
    plan = Runner(cfg, "cpu").plan
    weights = lora_b_weights(plan)  # random B: every A gradient is nonzero
    new_b = {n: 0.5 * v.flip(0) for n, v in list(weights.items())[:3]}  # a mid-run write (a restored checkpoint)

    kept = Runner(cfg, "cuda", plan=plan, weights=weights)
    got = _train(kept, splits, steps=2, rewrite=new_b)
    buffers = _kept_buffers(kept)
    assert buffers  # every adapter weight keeps parts of its own
    counts = [(kind, [p for p in ptrs if p in buffers]) for kind, ptrs in got[3]]  # (activations split per GEMM)
    # the first micro-step splits each buffer once; later micro-steps split none; each optimizer step splits every
    # buffer once (each adapter weight is written once); a write splits what derives from the weights it writes
    assert counts[0][0] == "micro" and sorted(counts[0][1]) == sorted(buffers)
    assert [c for kind, c in counts[1:] if kind == "micro"] == [[]] * 3
    assert all(sorted(c) == sorted(buffers) for kind, c in counts if kind == "optimizer")
    (written,) = [c for kind, c in counts if kind == "write"]
    assert 0 < len(written) < len(buffers) and len(set(written)) == len(written)

    monkeypatch.setenv("SUROGATE_SPLIT_CACHE", "0")  # a split at every GEMM, into shared scratch
    every = _train(Runner(cfg, "cuda", plan=plan, weights=weights), splits, steps=2, rewrite=new_b)
    assert _same(got, every)
    assert not all(torch.equal(got[2][0][n], got[2][1][n]) for n in got[2][0])  # the weights did change

    monkeypatch.setenv("SUROGATE_SPLIT_CACHE", "run")  # once per program run
    per_run = _train(Runner(cfg, "cuda", plan=plan, weights=weights), splits, steps=2, rewrite=new_b)
    assert _same(got, per_run)
    per_run_buffers = _kept_buffers(kept)
    assert all(not set(c) & per_run_buffers for kind, c in per_run[3] if kind == "optimizer")
    assert all(len(c) == len(got[3][0][1]) for kind, c in per_run[3] if kind == "micro")


def test_without_the_write_hook_the_kept_parts_go_stale(model_dir, splits, monkeypatch):
    """The check above can fail: with the executor's hook silenced, the parts keep the first step's weights and
    the second step's gradients differ from a split at every GEMM."""
    cfg = sim_cfg(model_dir, batch=1, seq=8, **CFG)
    plan = Runner(cfg, "cpu").plan
    weights = lora_b_weights(plan)
    monkeypatch.setattr(CudaKernels, "weights_written", lambda self, names: None)
    stale = _train(Runner(cfg, "cuda", plan=plan, weights=weights), splits, micro=1)
    monkeypatch.setenv("SUROGATE_SPLIT_CACHE", "0")
    every = _train(Runner(cfg, "cuda", plan=plan, weights=weights), splits, micro=1)
    assert stale[0][0] == every[0][0]  # the first step reads the weights it split
    assert stale[0][1] != every[0][1]
