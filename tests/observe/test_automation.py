"""Non-finite guard, auto LR reduction, early stopping and epoch adjustment: exact firing steps and effects."""

from __future__ import annotations

import random

from surogate.runtime.observe.diagnostics import (
    AutoLRReducer,
    EarlyStopper,
    NonFiniteGuard,
    PhaseDetector,
    adjust_epochs,
    budget_line,
    chinchilla_tokens,
)
from surogate.runtime.observe.events import Phase


def noisy(t: int) -> float:
    return 2.0 + 0.01 * (-1) ** t  # mean 2.0, population std 0.01


# -- non-finite --------------------------------------------------------------------------------------
def test_nonfinite_three_consecutive_stop():
    g = NonFiniteGuard()
    assert g.record(10, 2, "loss")[1] is None
    assert g.record(11, 0, "loss")[1] is None
    msg, reason = g.record(12, 1, "gradients")
    assert "step 12, micro-batch 1" in msg and "3 in a row" in msg
    assert reason.startswith("3 consecutive steps with non-finite gradients")


def test_nonfinite_ten_total_with_good_steps_between():
    g = NonFiniteGuard()
    reasons = []
    for i in range(10):
        reasons.append(g.record(100 + 10 * i, None, "loss")[1])
        g.ok()  # a finite step in between: never 3 in a row
    assert reasons[:9] == [None] * 9
    assert reasons[9].startswith("10 steps with non-finite") and "step 190" in reasons[9]


def test_is_finite():
    assert NonFiniteGuard.is_finite(1.0, None)
    assert not NonFiniteGuard.is_finite(1.0, float("inf"))
    assert not NonFiniteGuard.is_finite(float("nan"))


# -- auto LR reduction -------------------------------------------------------------------------------
def drive(red: AutoLRReducer, losses: dict, grads: dict, steps: int):
    events = []
    for t in range(1, steps + 1):
        ev = red.update(t, losses.get(t, noisy(t)), grads.get(t, 1.0))
        if ev:
            events.append(ev)
    return events


def test_loss_spike_then_grad_explosion_halve_lr():
    red = AutoLRReducer()
    # 2.5 > 2.0 + 3 x 0.01 at steps 100 and 101: confirmed at 101; 102 is inside the 20-step cooldown; the
    # grad spike at 115 is also in cooldown; 25.0 at step 130 is > 10 x the window's mean grad norm (~1.2).
    events = drive(red, {100: 2.5, 101: 2.5, 102: 2.5}, {115: 11.0, 130: 25.0}, 200)
    assert [(e.step, e.scale, e.count) for e in events] == [(101, 0.5, 1), (130, 0.25, 2)]
    assert events[0].reason.startswith("loss spike") and events[1].reason.startswith("gradient explosion")
    assert red.scale == 0.25


def test_state_round_trip_continues_like_the_uninterrupted_detector():
    import json

    spikes, grads = {100: 2.5, 101: 2.5}, {130: 25.0}
    whole = AutoLRReducer()
    expected = drive(whole, spikes, grads, 200)
    first = AutoLRReducer()
    for t in range(1, 121):  # stop in the middle: after one reduction, while the window is full
        first.update(t, spikes.get(t, noisy(t)), grads.get(t, 1.0))
    second = AutoLRReducer()
    second.load(json.loads(json.dumps(first.state())))  # what a checkpoint stores
    later = [ev for t in range(121, 201) if (ev := second.update(t, spikes.get(t, noisy(t)), grads.get(t, 1.0)))]
    assert second.reductions == whole.reductions == expected and later == expected[1:]
    assert second.scale == whole.scale == 0.25


def test_small_bump_within_three_sigma_ignored():
    red = AutoLRReducer()
    assert drive(red, {100: 2.025, 101: 2.025}, {}, 150) == []  # 2.025 < 2.03
    assert red.scale == 1.0


def test_single_outlier_step_ignored():
    red = AutoLRReducer()
    assert drive(red, {100: 9.0, 140: 9.0, 142: 9.0}, {}, 200) == []  # never two in a row
    assert red.scale == 1.0


def test_gaussian_noise_never_reduces():
    rng = random.Random(0)
    red = AutoLRReducer()
    events = [red.update(t, 2.0 + rng.gauss(0.0, 0.2), 1.0 + rng.gauss(0.0, 0.1)) for t in range(1, 20_001)]
    assert [e for e in events if e] == []


def test_no_detection_before_min_history():
    red = AutoLRReducer()
    assert drive(red, {10: 50.0}, {12: 1e4}, 19) == []


def test_at_most_five_reductions():
    red = AutoLRReducer()
    spikes = {t + d: 100.0 for t in range(60, 600, 60) for d in (0, 1)}  # 9 two-step spikes, 60 apart
    events = drive(red, spikes, {}, 600)
    assert [e.step for e in events] == [61, 121, 181, 241, 301]
    assert red.scale == 0.5**5


# -- early stopping ----------------------------------------------------------------------------------
def test_convergence_score_fires_after_five_consecutive_evals():
    es = EarlyStopper(total_params=1_000_000)
    evals = [3.0, 2.5, 2.2, 2.0]
    for _ in range(6):
        evals.append(evals[-1] * (1 - 0.001))  # 0.1% improvement -> score 0.9
    reasons = [es.on_eval(100 * (k + 1), loss) for k, loss in enumerate(evals)]
    # eval 5 (step 500) starts the streak; the 5th high score is eval 9 (step 900)
    assert reasons[:8] == [None] * 8
    assert reasons[8].startswith("converged") and "step 900" in reasons[8]
    assert abs(es.last_score - 0.9) < 1e-9


def test_convergence_streak_resets_on_improvement():
    es = EarlyStopper(total_params=1)
    losses = [2.0, 1.999, 1.998, 1.997, 1.996, 1.5, 1.4995, 1.499, 1.4985]
    assert all(es.on_eval(i, loss) is None for i, loss in enumerate(losses))
    assert es.convergence_streak == 3
    assert es.convergence_score(2.0, 2.1) == 1.0  # worse eval loss: no progress at all


def run_stopper(losses, tokens=1000, **kw):
    es, det = EarlyStopper(total_params=1_000_000, **kw), PhaseDetector()
    for t, loss in enumerate(losses, 1):
        phase, _ = det.update(t, loss)
        reason = es.on_step(t, loss, tokens, phase, det.steps_in_phase)
        if reason:
            return t, reason
    return None, None


def test_divergence_stops_after_200_steps():
    # DIVERGING from step 100 (phase window 100) -> the 200th consecutive diverging step is 299
    step, reason = run_stopper([2.0 + 0.01 * t for t in range(1, 400)])
    assert step == 299 and reason.startswith("diverging: loss rising for 200")


def test_plateau_stops_after_500_steps():
    step, reason = run_stopper([2.0] * 700)
    assert step == 599 and reason.startswith("plateau: no loss improvement for 500")


def interval_curve(decay: float, intervals: int, width: int = 100) -> list[float]:
    """Loss constant within each `width`-step interval; the drop between intervals k and k+1 is decay**k."""
    level, out = 10.0, []
    for k in range(intervals):
        out += [level] * width
        level -= decay ** (k + 1)
    return out


def stop_on_efficiency(losses, **kw):
    es = EarlyStopper(total_params=1_000_000, **kw)
    for t, loss in enumerate(losses, 1):
        reason = es.on_step(t, loss, 1000, Phase.CONVERGING, 1)
        if reason:
            return t, reason, es
    return None, None, es


def test_efficiency_fast_decay():
    # efficiencies e_j ~ 0.8**j measured at steps 200, 300, ...; e_j / e_1 = 0.8**(j-1) < 0.5 first for j = 5
    step, reason, es = stop_on_efficiency(interval_curve(0.8, 12))
    assert step == 600 and reason.startswith("compute efficiency fell to 41.0% of its peak")
    assert abs(es.efficiencies[0] - 0.8 / (6e6 * 100 * 1000)) < 1e-20  # loss drop / (6 N x tokens)


def test_efficiency_slow_decay():
    step, _, _ = stop_on_efficiency(interval_curve(0.9, 12))  # 0.9**7 = 0.478 -> j = 8 -> step 900
    assert step == 900


def test_efficiency_steady_never_fires_and_warmup_excluded():
    assert stop_on_efficiency(interval_curve(0.95, 12))[0] is None  # 0.95**10 = 0.60 > 0.5
    # with 100 warmup steps the intervals shift by 100 steps: fast decay fires at step 700
    assert stop_on_efficiency([20.0] * 100 + interval_curve(0.8, 12), warmup_steps=100)[0] == 700


# -- Chinchilla budget and epoch adjustment ----------------------------------------------------------
def test_epoch_adjustment():
    assert chinchilla_tokens(1_000_000) == 20_000_000
    up = adjust_epochs(3, -1, 1_000_000, 4_000_000)
    assert (up.num_epochs, up.changed) == (5, True) and "3 -> 5" in up.message
    down = adjust_epochs(3, -1, 1_000_000, 9_000_000)
    assert down.num_epochs == 2
    huge = adjust_epochs(3, -1, 1_000_000, 50_000_000)
    assert huge.num_epochs == 1 and "exceeds the budget" in huge.message
    same = adjust_epochs(3, -1, 1_000_000, 6_500_000)
    assert (same.num_epochs, same.changed) == (3, False) and "already matches" in same.message
    fixed = adjust_epochs(3, 500, 1_000_000, 4_000_000)
    assert (fixed.num_epochs, fixed.changed) == (3, False) and "max_steps=500" in fixed.message
    assert adjust_epochs(3, -1, 1_000_000, 4_000_000, enabled=False) == adjust_epochs(3, -1, 1, 1, False)


def test_budget_line():
    line = budget_line(600_000_000, 3_000_000_000)
    assert line == "Chinchilla budget: 20 x 600M params = 12B tokens; planned 3B tokens (25% of budget)"
