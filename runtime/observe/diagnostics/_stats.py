"""Small statistics over short float sequences (no numpy needed for windows of a few hundred)."""

from __future__ import annotations

import math
from collections.abc import Sequence


def mean(xs: Sequence[float]) -> float:
    return math.fsum(xs) / len(xs)


def pstdev(xs: Sequence[float]) -> float:
    """Population standard deviation (the window *is* the population we compare against)."""
    m = mean(xs)
    return math.sqrt(math.fsum((x - m) ** 2 for x in xs) / len(xs))


def median(xs: Sequence[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def rel_change(old: float, new: float) -> float:
    """(new - old) / |old|, guarded against a zero reference."""
    return (new - old) / max(abs(old), 1e-12)


def lag1_autocorrelation(xs: Sequence[float]) -> float:
    """Correlation of each value with the next (mean removed): about 0 for independent noise, -1 for a
    sequence alternating around its mean, positive for a trend; 0 for a constant sequence."""
    m = mean(xs)
    var = math.fsum((x - m) ** 2 for x in xs)
    if var == 0.0:
        return 0.0
    return math.fsum((a - m) * (b - m) for a, b in zip(xs[:-1], xs[1:], strict=True)) / var


def step_spread(xs: Sequence[float]) -> float:
    """Standard deviation of the successive differences: the step-to-step noise with a slow trend removed."""
    return pstdev([b - a for a, b in zip(xs[:-1], xs[1:], strict=True)]) if len(xs) > 2 else 0.0
