"""Paired comparisons with intervals: a paired t over seeds, a paired bootstrap over eval items, Holm.

What ``bench_mixing`` and the demo report claim rests on these: a difference
between two caption modes is given with its 95% interval, and a family of
contrasts fixed before the runs is corrected for multiple comparisons (Holm).
Pure numpy (Student's t by numerical integration), checked against tabled values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def t_cdf(t: float, df: int) -> float:
    """Student's t distribution function (Simpson's rule on the density; error < 1e-7 for df >= 1)."""
    x = np.linspace(0.0, abs(t), 20001)
    density = (
        math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2)) * (1 + x**2 / df) ** (-(df + 1) / 2)
    )
    h = x[1] - x[0] if len(x) > 1 else 0.0
    half = h / 3 * (density[0] + density[-1] + 4 * density[1:-1:2].sum() + 2 * density[2:-1:2].sum())
    return 0.5 + math.copysign(half, t)


def t_quantile(q: float, df: int) -> float:
    lo, hi = -100.0, 100.0
    for _ in range(80):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < q else (lo, mid)
    return (lo + hi) / 2


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float
    p: float | None = None  # two-sided p-value of "no difference" (paired t), when it has one

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def __str__(self) -> str:
        return f"{100 * self.estimate:+.1f} [{100 * self.low:+.1f}, {100 * self.high:+.1f}]"


def paired_t(a: list[float], b: list[float], level: float = 0.95) -> Interval:
    """Mean of ``a - b`` (paired: the same seed in both) with its t interval and p-value."""
    d = np.asarray(a, float) - np.asarray(b, float)
    n = len(d)
    if n < 2:
        raise ValueError("paired_t needs at least 2 pairs")
    mean, se = float(d.mean()), float(d.std(ddof=1) / math.sqrt(n))
    if se == 0:
        return Interval(mean, mean, mean, 1.0 if mean == 0 else 0.0)
    half = t_quantile(0.5 + level / 2, n - 1) * se
    return Interval(mean, mean - half, mean + half, 2 * (1 - t_cdf(abs(mean / se), n - 1)))


def paired_bootstrap(a: np.ndarray, b: np.ndarray, level: float = 0.95, draws: int = 2000, seed: int = 0) -> Interval:
    """Mean of ``a - b`` over eval items (e.g. per image, a hit averaged over seeds), with a percentile
    bootstrap interval that resamples items: the uncertainty of the eval set, not of training."""
    d = np.asarray(a, float) - np.asarray(b, float)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(draws, len(d)))].mean(axis=1)
    tail = (1 - level) / 2
    return Interval(float(d.mean()), float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail)))


def holm(p_values: list[float], alpha: float = 0.05) -> list[bool]:
    """Holm's step-down correction: which hypotheses are rejected, family-wise error at ``alpha``."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    rejected = [False] * len(p_values)
    for rank, i in enumerate(order):
        if p_values[i] > alpha / (len(p_values) - rank):
            break
        rejected[i] = True
    return rejected
