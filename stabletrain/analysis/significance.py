"""Small-sample statistics for the reproduction report, without SciPy: Student's t distribution, Welch's t-test of
two means, the t interval of one mean, and the least-squares slope with its interval.

Every interval is two-sided at `level` (0.95 by default) and every p-value two-sided. The t distribution comes from
the regularized incomplete beta function (a continued fraction, Numerical Recipes §6.4), accurate to ~1e-12.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Sequence

LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """An estimate, its confidence interval [lo, hi], the two-sided p-value of "the true value is 0", the degrees
    of freedom of the t distribution used and the standard error."""

    estimate: float
    lo: float
    hi: float
    p: float
    df: float
    se: float


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        for aa in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with `df` degrees of freedom."""
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return tail if t >= 0 else 1.0 - tail


def t_ppf(q: float, df: float) -> float:
    """The q-quantile of Student's t (bisection on the distribution function; q in (0, 1))."""
    if q < 0.5:
        return -t_ppf(1.0 - q, df)
    lo, hi = 0.0, 1.0
    while t_sf(hi, df) > 1.0 - q:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_sf(mid, df) > 1.0 - q else (lo, mid)
    return 0.5 * (lo + hi)


def _interval(estimate: float, se: float, df: float, level: float) -> Interval:
    if not math.isfinite(se) or not df > 0:  # too few values for a spread: nothing can be told apart
        return Interval(estimate, -math.inf, math.inf, math.nan, df, se)
    if se == 0.0:  # no spread at all: the estimate is exact
        return Interval(estimate, estimate, estimate, 1.0 if estimate == 0 else 0.0, df, se)
    half = t_ppf(0.5 + level / 2.0, df) * se
    return Interval(estimate, estimate - half, estimate + half, 2.0 * t_sf(abs(estimate) / se, df), df, se)


def welch(a: Sequence[float], b: Sequence[float], level: float = LEVEL) -> Interval:
    """mean(a) - mean(b) with Welch's t interval (unequal variances, Welch-Satterthwaite degrees of freedom)."""
    na, nb = len(a), len(b)
    diff = statistics.fmean(a) - statistics.fmean(b)
    if na < 2 or nb < 2:
        return _interval(diff, math.nan, math.nan, level)
    va, vb = statistics.variance(a) / na, statistics.variance(b) / nb
    se2 = va + vb
    df = se2 * se2 / (va * va / (na - 1) + vb * vb / (nb - 1)) if se2 > 0 else na + nb - 2
    return _interval(diff, math.sqrt(se2), df, level)


def mean_interval(xs: Sequence[float], level: float = LEVEL) -> Interval:
    """The mean of xs with its t interval (n - 1 degrees of freedom)."""
    n = len(xs)
    m = statistics.fmean(xs)
    if n < 2:
        return _interval(m, math.nan, math.nan, level)
    return _interval(m, statistics.stdev(xs) / math.sqrt(n), n - 1, level)


def ols_slope(xs: Sequence[float], ys: Sequence[float], level: float = LEVEL) -> Interval:
    """The least-squares slope of ys on xs with its t interval (n - 2 degrees of freedom)."""
    n = len(xs)
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    if n < 3:
        return _interval(slope, math.nan, math.nan, level)
    sse = sum((y - my - slope * (x - mx)) ** 2 for x, y in zip(xs, ys))
    return _interval(slope, math.sqrt(sse / (n - 2) / sxx), n - 2, level)


def difference(a: Interval, b: Interval, level: float = LEVEL) -> Interval:
    """a - b of two independent t estimates (the slopes of two groups), with Welch-Satterthwaite degrees of
    freedom."""
    se2 = a.se**2 + b.se**2
    df = se2 * se2 / (a.se**4 / a.df + b.se**4 / b.df) if se2 > 0 else a.df + b.df
    return _interval(a.estimate - b.estimate, math.sqrt(se2), df, level)
