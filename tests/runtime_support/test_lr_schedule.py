"""LR schedules against Hugging Face's schedulers, and exact values at phase boundaries."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import (
    get_cosine_schedule_with_warmup,
    get_cosine_with_min_lr_schedule_with_warmup,
    get_linear_schedule_with_warmup,
    get_wsd_schedule,
)

from surogate.errors import UserError
from surogate.runtime.lr_schedule import LRScheduler, lr_at, warmup_steps_for
from surogate.schema import config_from_dict

LR = 3e-4


def _cfg(**kw):
    base = {"model": "Qwen/Qwen3-0.6B", "learning_rate": LR}
    return config_from_dict(base | kw)


def _hf_lrs(make, total: int, **kw) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    sched = make(opt, **kw)
    out = []
    for _ in range(total + 1):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("total,warmup", [(50, 0), (50, 7), (13, 1), (100, 99)])
def test_linear_matches_hf(total, warmup):
    cfg = _cfg(lr_scheduler_type="linear", warmup_steps=warmup)
    ref = _hf_lrs(get_linear_schedule_with_warmup, total, num_warmup_steps=warmup, num_training_steps=total)
    ours = [lr_at(s, total, cfg) for s in range(total + 1)]
    assert ours == pytest.approx(ref, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("total,ratio", [(50, 0.0), (50, 0.03), (37, 0.1), (10, 0.5)])
def test_cosine_matches_hf_with_ratio_warmup(total, ratio):
    cfg = _cfg(lr_scheduler_type="cosine", warmup_ratio=ratio)
    warmup = math.ceil(ratio * total)  # TrainingArguments.get_warmup_steps
    assert warmup_steps_for(total, cfg) == warmup
    ref = _hf_lrs(get_cosine_schedule_with_warmup, total, num_warmup_steps=warmup, num_training_steps=total)
    ours = [lr_at(s, total, cfg) for s in range(total + 1)]
    assert ours == pytest.approx(ref, rel=1e-12, abs=1e-15)


def test_cosine_floor_matches_hf_min_lr_schedule():
    cfg = _cfg(lr_scheduler_type="cosine", warmup_steps=5, final_lr_fraction=0.1)
    ref = _hf_lrs(get_cosine_with_min_lr_schedule_with_warmup, 40, num_warmup_steps=5, num_training_steps=40,
                  min_lr_rate=0.1)
    assert [lr_at(s, 40, cfg) for s in range(41)] == pytest.approx(ref, rel=1e-12)
    assert lr_at(40, 40, cfg) == pytest.approx(0.1 * LR, rel=1e-12)


def test_warmup_steps_override_ratio():
    cfg = _cfg(warmup_steps=4, warmup_ratio=0.5)
    assert warmup_steps_for(100, cfg) == 4


def test_linear_floor_is_exact():
    cfg = _cfg(lr_scheduler_type="linear", final_lr_fraction=0.25, warmup_steps=10)
    assert lr_at(10, 110, cfg) == pytest.approx(LR)
    assert lr_at(60, 110, cfg) == pytest.approx(LR * (0.25 + 0.75 * 0.5))
    assert lr_at(110, 110, cfg) == pytest.approx(0.25 * LR)


def test_wsd_shape_at_phase_boundaries():
    cfg = _cfg(lr_scheduler_type="wsd", warmup_steps=10, cooldown_steps=20, final_lr_fraction=0.1)
    total = 100
    assert lr_at(0, total, cfg) == 0.0
    assert lr_at(5, total, cfg) == pytest.approx(0.5 * LR)
    assert lr_at(10, total, cfg) == LR  # end of warmup: stable starts
    assert lr_at(79, total, cfg) == LR  # last stable step
    assert lr_at(80, total, cfg) == LR  # cooldown starts at lr ...
    assert lr_at(90, total, cfg) == pytest.approx(LR * (1 - 0.5 * 0.9))  # ... halfway ...
    assert lr_at(100, total, cfg) == pytest.approx(0.1 * LR)  # ... ends at the floor


def test_wsd_matches_hf_after_warmup():
    # HF's wsd warmup starts at min_lr_ratio (ours starts at 0, as configuration.md says); later phases agree.
    cfg = _cfg(lr_scheduler_type="wsd", warmup_steps=6, cooldown_steps=15, final_lr_fraction=0.2)
    ref = _hf_lrs(get_wsd_schedule, 60, num_warmup_steps=6, num_decay_steps=15, num_training_steps=60,
                  decay_type="linear", min_lr_ratio=0.2)
    assert [lr_at(s, 60, cfg) for s in range(6, 61)] == pytest.approx(ref[6:], rel=1e-12)


def test_wsd_without_decay_matches_hf_exactly():
    cfg = _cfg(lr_scheduler_type="wsd", warmup_steps=6, cooldown_steps=15)
    ref = _hf_lrs(get_wsd_schedule, 60, num_warmup_steps=6, num_decay_steps=15, num_training_steps=60,
                  decay_type="linear")
    assert [lr_at(s, 60, cfg) for s in range(61)] == pytest.approx(ref, rel=1e-12, abs=1e-15)


def test_cosine_cooldown_is_linear_from_cosine_value_to_floor():
    cfg = _cfg(lr_scheduler_type="cosine", cooldown_steps=10, final_lr_fraction=0.05)
    no_cool = _cfg(lr_scheduler_type="cosine", final_lr_fraction=0.05)
    total = 50
    for s in range(0, 41):  # before the cooldown: plain cosine with floor
        assert lr_at(s, total, cfg) == lr_at(s, total, no_cool)
    start = lr_at(40, total, no_cool)
    for s in range(40, 51):
        expected = start + (0.05 * LR - start) * (s - 40) / 10
        assert lr_at(s, total, cfg) == pytest.approx(expected, rel=1e-12)
    # the straight cooldown differs from the cosine tail (it is the chord of a convex arc, so above it)
    assert lr_at(45, total, cfg) > lr_at(45, total, no_cool) * 1.1


def test_linear_cooldown_coincides_with_the_decay_line():
    cfg = _cfg(lr_scheduler_type="linear", cooldown_steps=10, final_lr_fraction=0.05, warmup_steps=4)
    plain = _cfg(lr_scheduler_type="linear", final_lr_fraction=0.05, warmup_steps=4)
    assert [lr_at(s, 50, cfg) for s in range(51)] == pytest.approx([lr_at(s, 50, plain) for s in range(51)])


def test_scheduler_scale_and_state_round_trip():
    cfg = _cfg(lr_scheduler_type="cosine", warmup_steps=3)
    a = LRScheduler(cfg, total_steps=30)
    for _ in range(7):
        a.step()
    assert a.lr() == lr_at(7, 30, cfg)
    a.reduce()
    assert a.lr() == pytest.approx(0.5 * lr_at(7, 30, cfg))
    b = LRScheduler(cfg, total_steps=30)
    b.load_state_dict(a.state_dict())
    assert (b.current_step, b.scale, b.reductions) == (7, 0.5, 1)
    assert [b.lr(s) for s in range(30)] == [a.lr(s) for s in range(30)]
    b.set_scale(0.25)
    assert b.lr() == pytest.approx(0.25 * lr_at(7, 30, cfg))


def test_incompatible_schedule_state_is_a_user_error():
    a = LRScheduler(_cfg(lr_scheduler_type="cosine"), total_steps=30)
    with pytest.raises(UserError, match="lr_scheduler_type"):
        LRScheduler(_cfg(lr_scheduler_type="linear"), total_steps=30).load_state_dict(a.state_dict())
    with pytest.raises(UserError, match="30 steps"):
        LRScheduler(_cfg(lr_scheduler_type="cosine"), total_steps=40).load_state_dict(a.state_dict())
    extended = LRScheduler(_cfg(lr_scheduler_type="cosine"), total_steps=40)
    extended.load_state_dict(a.state_dict(), strict=False)
    assert extended.total_steps == 40


def test_zero_steps_is_a_user_error():
    with pytest.raises(UserError, match="total_steps=0"):
        lr_at(0, 0, _cfg())
