"""Training modes end to end on the cpu backend: from_scratch (+ init_projections_to_zero), adapter_path,
lora_dtype bf16, optimizer normuon, max_grad_norm clipping, eval_steps, and the LR schedule reaching the
optimizer."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from surogate.compiler.ir import Role
from surogate.runtime.executor import MICRO_STEP
from surogate.runtime.lr_schedule import lr_at
from surogate.runtime.observe.jsonl import read_log
from surogate.runtime.session import run_training
from tests.runtime.helpers import (
    PROJ,
    build_trainer,
    hf_config,
    random_batch,
    save_model,
    text_cfg,
    trainer_loss,
    write_text_data,
)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("modes")
    save_model(root / "model", "qwen3")
    write_text_data(root / "train.jsonl", rows=48)
    write_text_data(root / "eight.jsonl", rows=8, seed=3)
    return root


def _cfg(root, name, data="train.jsonl", **over):
    return text_cfg(root / "model", root / data, root / name, **over)


# ------------------------------------------------------------------------------------------- from_scratch

@pytest.mark.parametrize("zero_init", [True, False])
def test_from_scratch_uses_hf_init_and_zeroes_projections(root, zero_init):
    cfg = _cfg(root, f"scratch-{zero_init}", from_scratch=True, init_projections_to_zero=zero_init, train_seed=7)
    trainer = build_trainer(cfg)
    torch.manual_seed(7)
    ref = AutoModelForCausalLM.from_config(hf_config("qwen3"), dtype=torch.float32)
    pretrained = AutoModelForCausalLM.from_pretrained(root / "model", dtype=torch.float32)
    weights = trainer.ex.tensors_of([Role.TRAINABLE_WEIGHT])
    ref_params = dict(ref.named_parameters())
    assert set(weights) == set(ref_params)
    zeroed = [n for n in weights if n.endswith(("o_proj.weight", "down_proj.weight"))]
    assert len(zeroed) == 4
    with torch.no_grad():
        for name, value in weights.items():
            if zero_init and name in zeroed:
                assert not value.any(), name
                ref_params[name].zero_()
            else:
                assert torch.equal(value, ref_params[name]), name
    # the random init, not the folder's weights
    assert not torch.equal(weights["model.embed_tokens.weight"], pretrained.model.embed_tokens.weight)
    ids, labels = random_batch(2, 16)
    with torch.no_grad():
        ref_loss = float(ref.eval()(input_ids=ids, labels=labels).loss)
    assert abs(trainer_loss(trainer, ids, labels) - ref_loss) <= 1e-5 * ref_loss
    trainer.train_step()
    if zero_init:  # zero-initialised projections still learn (their gradient is not zero)
        assert all(weights[n].any() for n in zeroed)


# ------------------------------------------------------------------------------------------- adapter_path

def _save_adapter(root, out, **kw):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(5)
    base = AutoModelForCausalLM.from_pretrained(root / "model", dtype=torch.float32, attn_implementation="eager")
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=16, lora_dropout=0.0, target_modules=list(PROJ),
                                                 init_lora_weights=False, **kw))
    peft_model.save_pretrained(out)


ADAPTERS = {"plain": {}, "rslora": {"use_rslora": True}, "rank_pattern": {"rank_pattern": {"q_proj": 2}}}


@pytest.mark.parametrize("kind", list(ADAPTERS))
def test_adapter_path_is_merged_before_training(root, tmp_path, kind):
    from peft import PeftModel

    _save_adapter(root, tmp_path / "adapter", **ADAPTERS[kind])
    loaded = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(root / "model", dtype=torch.float32, attn_implementation="eager"),
        tmp_path / "adapter").eval()
    ids, labels = random_batch(2, 16, seed=9)
    with torch.no_grad():
        ref = float(loaded(input_ids=ids, labels=labels).loss)
    cfg = _cfg(root, f"adapter-{kind}", lora=True, lora_rank=8, lora_alpha=16, adapter_path=str(tmp_path / "adapter"))
    trainer = build_trainer(cfg)
    ours = trainer_loss(trainer, ids, labels)
    base_only = build_trainer(_cfg(root, f"no-adapter-{kind}", lora=True, lora_rank=8))
    assert abs(trainer_loss(base_only, ids, labels) - ref) > 1e-3  # the adapter changes the loss
    assert abs(ours - ref) <= 1e-5 * ref, (ours, ref)
    # the merged adapter is frozen base weight; the run's own adapters start fresh (B = 0)
    fresh_b = [v for n, v in trainer.ex.tensors_of([Role.TRAINABLE_WEIGHT]).items() if ".lora_B." in n]
    assert fresh_b and not any(v.any() for v in fresh_b)


def test_adapter_path_that_cannot_be_merged_is_a_user_error(root, tmp_path):
    from surogate.errors import UserError

    _save_adapter(root, tmp_path / "dora", use_dora=True)
    with pytest.raises(UserError, match="DoRA"):
        build_trainer(_cfg(root, "dora", lora=True, adapter_path=str(tmp_path / "dora")))


# --------------------------------------------------------------------------------- lora bf16, normuon

@pytest.mark.parametrize("master", [None, "fp32"])
def test_lora_bf16_trains(root, master):
    cfg = _cfg(root, f"bf16-{master}", data="eight.jsonl", lora=True, lora_rank=4, lora_dtype="bf16",
               master_dtype=master, per_device_train_batch_size=8, max_steps=4, learning_rate=1e-2)
    trainer = build_trainer(cfg)
    lora = {n: t for n, t in trainer.plan.tensors.items() if t.role is Role.TRAINABLE_WEIGHT}
    assert lora and all(".lora_" in n and t.dtype == "bf16" for n, t in lora.items())
    masters = [t for t in trainer.plan.tensors.values() if t.role is Role.MASTER_WEIGHT]
    # masters default to the weights' dtype (configuration.md); master_dtype fp32 adds them
    assert {t.attrs["master_of"] for t in masters} == (set(lora) if master else set())
    losses = [trainer.train_step()[0] for _ in range(4)]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    for t in masters:  # the bf16 weights are the rounded masters
        assert torch.equal(trainer.ex.views[t.attrs["master_of"]], trainer.ex.views[t.name].to(torch.bfloat16))


def test_normuon_end_to_end(root):
    cfg = _cfg(root, "normuon", data="eight.jsonl", optimizer="normuon", per_device_train_batch_size=4,
               gradient_accumulation_steps=2, max_steps=5, learning_rate=0.01, weight_decay=0.01)
    result = run_training(cfg)
    kinds = {op.kind for op in build_trainer(cfg).plan.ops}
    assert {"normuon_step", "adamw8bit_step"} <= kinds  # matrices by NorMuon, embeddings/norms by AdamW
    assert result.steps == 5 and all(math.isfinite(x) for x in result.losses)
    # every step sees the same 8 rows: the loss must fall
    assert result.losses[-1] < result.losses[0] - 0.05, result.losses


# ----------------------------------------------------------------------------------------- clipping

def _m_absmax(trainer):
    return {n: v.clone() for n, v in trainer.ex.views.items() if n.endswith("@m_absmax")}


def test_max_grad_norm_scales_the_gradient_the_optimizer_sees(root):
    """After one AdamW step, m = (1 - beta1) * g * clip_scale: its blockwise absmax shows the clip scale."""
    free = build_trainer(_cfg(root, "noclip", max_grad_norm=0.0))
    _, norm, _, _ = free.train_step()
    limit = norm / 4
    clipped = build_trainer(_cfg(root, "clip", max_grad_norm=limit))
    _, norm_clipped, _, _ = clipped.train_step()
    assert norm_clipped == pytest.approx(norm, rel=1e-6)  # the logged norm is the norm before clipping
    a, b = _m_absmax(free), _m_absmax(clipped)
    assert a
    for name in a:
        assert torch.allclose(b[name], a[name] * limit / (norm + 1e-6), rtol=1e-5, atol=1e-12), name
    # a limit above the norm changes nothing
    loose = build_trainer(_cfg(root, "loose", max_grad_norm=norm * 2))
    loose.train_step()
    assert all(torch.equal(_m_absmax(loose)[n], a[n]) for n in a)


# ------------------------------------------------------------------------------------------- eval, LR

def test_eval_steps_and_logged_lr_follow_the_schedule(root):
    cfg = _cfg(root, "sched", max_steps=6, eval_steps=2, validation_split_ratio=0.25, lr_scheduler_type="cosine",
               warmup_steps=2, final_lr_fraction=0.1, learning_rate=1e-3)
    result = run_training(cfg)
    assert [s for s, _ in result.eval_losses] == [2, 4, 6]
    log = read_log(cfg.log_file)
    assert [r["step"] for r in log.evals] == [2, 4, 6]
    assert [r["loss"] for r in log.evals] == [v for _, v in result.eval_losses]
    lrs = {r["step"]: r["lr"] for r in log.steps}
    assert sorted(lrs) == list(range(1, 7))
    for step, lr in lrs.items():
        assert lr == pytest.approx(lr_at(step - 1, 6, cfg), rel=1e-12, abs=0), step


def test_schedule_lr_is_the_lr_the_optimizer_applies(root):
    """With zero gradients AdamW's update is pure decay, W *= 1 - lr * wd: the applied lr is measurable."""
    wd = 1.0
    cfg = _cfg(root, "applied", max_steps=5, lr_scheduler_type="linear", warmup_steps=1, final_lr_fraction=0.2,
               learning_rate=1e-2, weight_decay=wd)
    trainer = build_trainer(cfg)
    trainer.ex.programs[MICRO_STEP] = []  # no forward/backward: the gradients stay zero
    trainer.ex.observed[trainer.loss_name] = torch.tensor(0.0)
    name = "model.layers.0.mlp.up_proj.weight"
    w = trainer.ex.views[name]
    for step in range(5):
        before = w.clone()
        trainer.train_step()
        mask = before.abs() > 1e-2
        applied = float(((1 - w[mask].double() / before[mask].double()) / wd).mean())
        assert applied == pytest.approx(lr_at(step, 5, cfg), rel=1e-4, abs=1e-9), step


def test_non_finite_step_is_not_applied(root):
    trainer = build_trainer(_cfg(root, "nonfinite"))
    trainer.ex.views["model.norm.weight"][0] = float("nan")
    before = {n: v.clone() for n, v in trainer.state_tensors().items()}
    loss, _, _, bad_micro = trainer.train_step()
    assert math.isnan(loss) and bad_micro == 0
    assert trainer.step == 1 and trainer.applied == 0
    after = trainer.state_tensors()
    # weights, moments and counters untouched (the NaN weight itself compares unequal to itself)
    assert all(torch.equal(after[n], before[n]) for n in before if n != "model.norm.weight")
