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
