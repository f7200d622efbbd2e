"""How sure a number is: a 95% Student-t interval over seeds, differences between cells (paired by seed where the
runs share their seeds and data order, Welch's otherwise), and the verdict a difference supports.

Seeds are the replicates; the test set is one fixed sample, so its binomial error is a floor under every
interval a verdict is judged on (docs/reports.md says why and how).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

CONFIDENCE = 0.95
HOLDS, FAILS, UNDECIDED = "holds", "does not hold", "undecided"


@dataclass(frozen=True)
class Estimate:
    """A mean over `n` seeds with its standard deviation and 95% interval (None for one seed: no interval)."""

    mean: float
    std: float
    n: int
    low: float | None = None
    high: float | None = None
    paired: bool | None = None  # a difference: whether its seeds were paired

    @property
    def half_width(self) -> float | None:
        return None if self.low is None else (self.high - self.low) / 2

    def shifted(self, by: float, sign: float = 1.0) -> Estimate:
        """by + sign · self: a margin read off a difference (e.g. 2 − spread)."""
        low, high = (None, None) if self.low is None else sorted((by + sign * self.low, by + sign * self.high))
        return Estimate(by + sign * self.mean, self.std, self.n, low, high, self.paired)


def _t_interval(mean: float, std: float, n: int, df: float | None = None) -> tuple[float | None, float | None]:
    if n < 2:
        return None, None
    if std == 0:
        return mean, mean
    low, high = stats.t.interval(CONFIDENCE, df if df is not None else n - 1, loc=mean, scale=std / math.sqrt(n))
    return float(low), float(high)


def estimate(values: Iterable[float]) -> Estimate:
    """Mean, sample standard deviation (ddof=1; 0 for one value) and the Student-t 95% interval of the mean."""
    v = np.asarray(list(values), dtype=float)
    if v.size == 0:
        raise ValueError("an estimate needs at least one value")
    mean, std = float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0
    return Estimate(mean, std, int(v.size), *_t_interval(mean, std, int(v.size)))


def difference(a: pd.Series, b: pd.Series, paired: bool) -> Estimate:
    """a − b for two cells given per seed (index: seed). Paired: the per-seed differences over the seeds both have
    (two or more); otherwise Welch's interval for two independent samples."""
    a, b = a.dropna(), b.dropna()
    common = a.index.intersection(b.index)
    if paired and len(common) >= 2:
        d = estimate(a[common] - b[common])
        return Estimate(d.mean, d.std, d.n, d.low, d.high, paired=True)
    mean = float(a.mean() - b.mean())
    n = min(len(a), len(b))
    if len(a) < 2 or len(b) < 2:
        return Estimate(mean, 0.0, n, None, None, paired=False)
    va, vb = float(a.var(ddof=1)) / len(a), float(b.var(ddof=1)) / len(b)
    if va + vb == 0:
        return Estimate(mean, 0.0, n, mean, mean, paired=False)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))  # Welch–Satterthwaite
    half = float(stats.t.ppf((1 + CONFIDENCE) / 2, df)) * math.sqrt(va + vb)
    return Estimate(mean, math.sqrt(va + vb), n, mean - half, mean + half, paired=False)


def binomial_error(error_pct: float, test_size: float | None) -> float:
    """The standard error, in points, of a test error measured on `test_size` images (NaN when the size or the
    error is not known)."""
    if test_size is None or pd.isna(test_size) or not test_size > 0 or not 0 <= error_pct <= 100:
        return math.nan
    p = error_pct / 100
    return 100 * math.sqrt(p * (1 - p) / test_size)


def binomial_floor(*cells: tuple[float, float | None]) -> float:
    """The test sets' sampling error of a difference, as a 95% half-width in points: cells are (error %, test size)."""
    errors = [binomial_error(p, size) for p, size in cells]
    variance = sum(e * e for e in errors if not math.isnan(e))
    return float(stats.norm.ppf((1 + CONFIDENCE) / 2)) * math.sqrt(variance)


def judged(margin: Estimate, floor: float = 0.0) -> tuple[float | None, float | None]:
    """The interval a verdict is judged on: the seed interval, widened to at least ± `floor`."""
    if margin.low is None:
        return None, None
    half = max(margin.half_width, floor)
    return margin.mean - half, margin.mean + half


def verdict(margin: Estimate, floor: float = 0.0) -> str:
    """holds: the judged interval of a margin (> 0: the claim's way) lies above zero; does not hold: below it;
    undecided: it covers zero, or there is no interval (one seed)."""
    low, high = judged(margin, floor)
    if low is None:
        return UNDECIDED
    return HOLDS if low > 0 else FAILS if high < 0 else UNDECIDED
