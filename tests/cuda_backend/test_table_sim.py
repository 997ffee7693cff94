"""Properties of the cuda kernel table beyond parity: outputs written in place into the planned views,
no new scratch after the first step, NorMuon + gradient clipping, and dropout masks that forward,
recompute and backward regenerate identically."""

from __future__ import annotations

import pytest
import torch

from surogate.errors import NotAvailableError
from tests.cuda_backend.helpers import (
    Runner,
    assert_close_grads,
    batch,
    pair,
    record_copies,
    rel_err,
    save_sim_model,
    sim_cfg,
)

LORA = dict(lora=True, lora_rank=4, lora_alpha=8)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_sim_model(tmp_path_factory.mktemp("cuda_table") / "qwen3")


@pytest.mark.slow  # ~1 min under the simulator; `pytest -m slow` runs it
def test_normuon_with_clipping_in_place_and_no_new_scratch(model_dir):
    """LoRA + NorMuon + max_grad_norm: same update as the cpu backend; every kernel output is the planned view
    (the executor copies nothing, copies between spaces aside); the second step allocates no scratch."""
    # adapters on two projections only: the simulator runs every NorMuon launch thread by thread
    ref, cud = pair(sim_cfg(model_dir, optimizer="normuon", max_grad_norm=0.01,
                            lora_target_modules=["q_proj", "down_proj"],
                            **LORA))
    assert {op.kind for op in ref.plan.ops} >= {"normuon_step", "grad_norm", "grad_clip_scale"}
    copied = record_copies(cud)
    ids, labels = batch(1, 8, seed=2)
    before = ref.trainable()
    for r in (ref, cud):
        r.micro_step(ids, labels)
        r.optimizer_step(0, lr_scale=0.5)
    # rope_table has no input to locate its arena by: the executor copies the cached cos/sin tables into their
    # views (the device-to-device copy the op stands for); every other output is written in place
    assert [n for n in copied if n not in ("rope.cos", "rope.sin")] == []
    clip = float(cud.ex.views["grad_clip_scale"])
    assert 0 < clip < 1, "max_grad_norm 0.01 must clip, else the clip path is untested"
    assert abs(clip - float(ref.ex.views["grad_clip_scale"])) < 1e-5 * clip
    w0, w1 = ref.trainable(), cud.trainable()
    for n in w0:
        assert not torch.equal(w0[n], before[n]), n
        assert rel_err(w1[n] - before[n], w0[n] - before[n]) < 1e-3, n
    state = cud.kernels.state
    held, n_scratch = state.scratch_bytes, len(state._scratch)
    cud.micro_step(ids, labels, step=1)
    cud.optimizer_step(1)
    assert (state.scratch_bytes, len(state._scratch)) == (held, n_scratch)


def test_adamw8bit_weights_share_one_hyperparameter_buffer_and_all_clip(model_dir, monkeypatch):
    """8-bit AdamW + max_grad_norm over two steps with different schedules: the weights share one hyperparameter
    buffer (one refresh and one clip copy per step, not one per weight), and every weight gets that step's
    learning rate and clip factor: the same updates as the cpu backend at both steps. (The AdamW kernel runs
    simulated; the micro-step's kernels as their references.)"""
    from tests.cuda_backend.helpers import reference_kernels

    reference_kernels(monkeypatch, keep=("adamw",))
    ref, cud = pair(sim_cfg(model_dir, optimizer="adamw_8bit", max_grad_norm=0.01,
                            lora_target_modules=["q_proj", "down_proj"], **LORA))
    for step, lr_scale in ((0, 1.0), (1, 0.25)):
        ids, labels = batch(1, 8, seed=5 + step)
        before = ref.trainable()
        for r in (ref, cud):
            r.micro_step(ids, labels, step=step)
            r.optimizer_step(step, lr_scale=lr_scale)
        clip = float(cud.ex.views["grad_clip_scale"])
        assert 0 < clip < 1, "max_grad_norm 0.01 must clip, else the shared clip copy is untested"
        w0, w1 = ref.trainable(), cud.trainable()
        assert len(w0) == 4  # q_proj and down_proj, A and B, one layer
        for n in w0:
            assert not torch.equal(w0[n], before[n]), (step, n)
            assert rel_err(w1[n] - before[n], w0[n] - before[n]) < 1e-3, (step, n)
    keys = [k for k in cud.kernels.state._scalars if k[0] == "adamw"]
    assert len(keys) == 1, keys


@pytest.mark.slow  # ~1 min under the simulator; `pytest -m slow` runs it
def test_dropout_masks_agree_between_forward_recompute_and_backward(model_dir):
    """With lora_dropout, recompute on and off give the same gradients (recompute regenerates the forward's
    mask, backward applies it)."""
    ids, labels = batch(1, 8, seed=6)
    plain = Runner(sim_cfg(model_dir, lora_dropout=0.5, **LORA), "cuda")
    recomputed = Runner(sim_cfg(model_dir, lora_dropout=0.5, recompute=True, **LORA), "cuda")
    from tests.cuda_backend.helpers import lora_b_weights

    for r in (plain, recomputed):
        for n, v in lora_b_weights(r.plan).items():
            r.ex.write(n, v)
    loss0, g0 = plain.micro_step(ids, labels, step=3)
    loss1, g1 = recomputed.micro_step(ids, labels, step=3)
    assert abs(loss0 - loss1) < 1e-6 * abs(loss0)
    assert_close_grads(g1, g0, 1e-5)


def test_kernel_table_refuses_without_gpu_or_simulator(monkeypatch):
    from surogate.numba_kernels import _device
    from surogate.runtime.backends import kernel_table

    monkeypatch.setattr(_device, "cuda_backend_available", lambda: False)
    with pytest.raises(NotAvailableError, match="needs a CUDA GPU"):
        kernel_table("cuda")
