"""Phase and plateau detectors driven by synthetic loss / grad-norm curves: exact firing steps."""

from __future__ import annotations

import math
import random

from surogate.runtime.observe.diagnostics import PhaseDetector, PlateauDetector
from surogate.runtime.observe.events import Phase


def run_phases(losses, grads=None, **kw):
    det = PhaseDetector(**kw)
    out = []
    for i, loss in enumerate(losses, 1):
        phase, _ = det.update(i, loss, None if grads is None else grads[i - 1])
        out.append(phase)
    return det, out


def first(phases, phase):
    return phases.index(phase) + 1


def test_constant_loss_is_plateau_once_window_full():
    det, phases = run_phases([2.0] * 80, window=50)
    assert set(phases[:49]) == {Phase.WARMUP}
    assert first(phases, Phase.PLATEAU) == 50
    assert det.steps_in_phase == 31  # steps 50..80


def test_lr_warmup_keeps_warmup_phase():
    losses = [3.0 - 0.01 * t for t in range(1, 101)]
    _, phases = run_phases(losses, window=50, warmup_steps=60)
    assert set(phases[:60]) == {Phase.WARMUP}
    assert phases[60] is Phase.CONVERGING  # step 61


def test_falling_loss_is_converging():
    _, phases = run_phases([3.0 - 0.01 * t for t in range(1, 61)], window=50)
    assert first(phases, Phase.CONVERGING) == 50


def test_rising_loss_is_diverging():
    # halves at step 50: mean 2.13 vs 2.38 -> +11.7% > 5%
    _, phases = run_phases([2.0 + 0.01 * t for t in range(1, 61)], window=50)
    assert first(phases, Phase.DIVERGING) == 50
    assert Phase.CONVERGING not in phases


def test_noisy_loss_is_unstable():
    # alternating 1.0 / 2.0: no trend, but std/mean = 0.5/1.5 > 0.15
    _, phases = run_phases([1.0 if t % 2 else 2.0 for t in range(1, 61)], window=50)
    assert first(phases, Phase.UNSTABLE) == 50
    assert Phase.DIVERGING not in phases


def test_grad_norm_spike_is_unstable_while_in_newer_half():
    grads = [1.0] * 120
    grads[59] = 20.0  # step 60
    det = PhaseDetector(window=50)
    phases = {}
    transitions = []
    for step in range(1, 121):
        phase, changed = det.update(step, 2.0, grads[step - 1])
        phases[step] = phase
        if changed:
            transitions.append((step, phase))
    assert phases[63] is Phase.PLATEAU
    # newer half = the last 25 steps: the spike counts from step 60 through step 84; each change is
    # reported after 5 steps of the new classification (dwell), at 64 and 89
    assert all(phases[s] is Phase.UNSTABLE for s in range(64, 89))
    assert transitions == [(1, Phase.WARMUP), (50, Phase.PLATEAU), (64, Phase.UNSTABLE), (89, Phase.PLATEAU)]


def test_dwell_suppresses_flapping():
    det = PhaseDetector(window=4, dwell=3)
    det._losses.extend([1.0, 1.0, 1.0])  # fill the window so classification starts at step 4
    steps = []
    for step, raw in enumerate([Phase.PLATEAU, Phase.CONVERGING, Phase.PLATEAU, Phase.CONVERGING,
                                Phase.CONVERGING, Phase.CONVERGING, Phase.PLATEAU], 4):
        det.classify = lambda _step, raw=raw: raw  # drive the debounce with a scripted classification
        steps.append(det.update(step, 1.0))
    assert steps == [(Phase.PLATEAU, True), (Phase.PLATEAU, False), (Phase.PLATEAU, False),
                     (Phase.PLATEAU, False), (Phase.PLATEAU, False), (Phase.CONVERGING, True),
                     (Phase.CONVERGING, False)]
    assert det.steps_in_phase == 2


def test_plateau_warning_exact_step_and_rearm():
    # 2.0 for 100 steps, 1.0 until step 400, 0.5 afterwards; window 100. At step s in [200, 300] the older
    # window holds a fraction x = (300 - s) / 100 of 2.0s: improvement = x / (1 + x), se = sqrt(x (1 - x)
    # / 100) / (1 + x) (the newer window is flat). improvement < 3 se  <=>  x < 0.09 (1 - x)  <=>  x < 0.0826
    # -> first at s = 292 (x = 0.08: 7.41% < 7.54%; s = 291: 8.26% > 7.88%). Same shape again at 592.
    losses = [2.0] * 100 + [1.0] * 300 + [0.5] * 300
    det = PlateauDetector(window=100, min_improvement=0.01)
    warnings = [(s, det.update(s, loss)) for s, loss in enumerate(losses, 1)]
    fired = [(s, w) for s, w in warnings if w]
    assert [s for s, _ in fired] == [292, 592]
    assert "step 292" in fired[0][1] and "improved by 7.41%" in fired[0][1] and "needs 7.54%" in fired[0][1]


def test_plateau_min_improvement_on_clean_curve():
    # noise-free linear decline of 0.1% of the level per window: below the 1% floor from the first check
    det = PlateauDetector(window=100, min_improvement=0.01)
    fired = [s for s in range(1, 401) if det.update(s, 100.0 - 0.001 * s)]
    assert fired == [200]
    fast = PlateauDetector(window=100, min_improvement=0.01)
    assert not any(fast.update(s, 100.0 - 0.05 * s) for s in range(1, 401))  # 5% per window: improving


def test_plateau_needs_two_windows():
    det = PlateauDetector(window=100)
    assert all(det.update(s, 1.0) is None for s in range(1, 200))
    assert det.update(200, 1.0) is not None


def test_flat_noisy_loss_reads_plateau_not_flipping():
    rng = random.Random(0)
    losses = [2.0 + rng.gauss(0.0, 0.2) for _ in range(2000)]  # 10% noise, no trend
    _, phases = run_phases(losses, window=100)
    counted = phases[99:]
    assert counted.count(Phase.PLATEAU) / len(counted) > 0.99
    assert Phase.DIVERGING not in counted and Phase.UNSTABLE not in counted


def test_noisy_decay_reads_converging_then_plateau():
    rng = random.Random(1)
    losses = [1.0 + 2.0 * math.exp(-t / 300) + rng.gauss(0.0, 0.1) for t in range(1, 3001)]
    _, phases = run_phases(losses, window=100)
    early, late = phases[99:400], phases[1500:]
    assert early.count(Phase.CONVERGING) == len(early)
    assert late.count(Phase.PLATEAU) / len(late) > 0.99


def test_noisy_plateau_warns_once():
    rng = random.Random(2)
    det = PlateauDetector(window=100)
    fired = [s for s in range(1, 3001) if det.update(s, 2.0 + rng.gauss(0.0, 0.3))]
    assert fired == [200]


def test_steady_noise_of_a_small_batch_is_plateau_not_unstable():
    """30% batch-to-batch noise that neither grows nor oscillates (a small batch on varied data: the tiny
    example's last hundred steps) is the data's spread, not an instability."""
    rng = random.Random(2)
    losses = [0.9 * (1 + rng.choice([-0.35, 0.0, 0.35]) + rng.gauss(0.0, 0.05)) for _ in range(400)]
    _, phases = run_phases(losses, window=100)
    assert Phase.UNSTABLE not in phases[99:]


def test_noise_that_grows_is_unstable():
    rng = random.Random(3)
    calm = [2.0 + rng.gauss(0.0, 0.1) for _ in range(100)]
    wild = [2.0 + rng.gauss(0.0, 0.8) for _ in range(60)]  # the spread grows eightfold, no oscillation needed
    _, phases = run_phases(calm + wild, window=100)
    assert Phase.UNSTABLE in phases[100:] and Phase.UNSTABLE not in phases[:100]
